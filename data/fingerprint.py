"""Fingerprint of everything that changes cached features.

The cache pass stores it in ``manifest.json``; the trainer recomputes it from
its own config and refuses a cache that disagrees, naming the first differing
field.  The source enters by its kind and options, never by the spelling of its paths: the raw
files themselves are recorded per unit by content (``data/identity.py``).
Weight digests hash every byte of each weight file (xxh3-128, ~20 GB/s, so
the disk is the limit), and are kept in a small per-machine file keyed by (path,
size, mtime): a T5-XXL costs one full read per machine, and every later check a
stat.  Any re-download, fine-tune, swap or in-place edit of the encoder changes
the mtime, so it is hashed again.  (An edit that restores the old mtime is not
seen: delete the digest file, ``$XDG_CACHE_HOME/tristage/weight_digests.json``.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import xxhash

from tristage.data.buckets import bucket_table
from tristage.data.cache_format import FORMAT
from tristage.data.config import DataConfig, EncoderConfig
from tristage.data.repa_features import RepaFeatures
from tristage.files import atomic_write

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
# data.source keys that say where the raw files are, not what they are: they stay out of the fingerprint.
# The files they name enter by content, per unit (data/identity.py), so a moved dataset keeps its cache.
SOURCE_PATHS = ("paths", "captions", "metadata", "synsets")
_CHUNK = 8 << 20


def tristage_version() -> str:
    try:
        return version("tristage")
    except PackageNotFoundError:
        return "0+unknown"


def local_dir(name_or_path: str | None) -> Path | None:
    """A local folder for a path or an already-downloaded hub id (never downloads)."""
    if name_or_path is None:
        return None
    if Path(name_or_path).exists():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not in the local hub cache: no digest can be taken
        return None


def digest_store() -> Path:
    """The per-machine file of known weight-file digests."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tristage" / "weight_digests.json"
    )


@contextmanager
def _known_digests() -> Iterator[dict]:
    """The stored digests, under an exclusive lock: the processes of one machine hash a file
    once between them (the others wait, then find it).  Unwritable home: no store, no sharing."""
    store = digest_store()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        lock = open(store.with_suffix(".lock"), "a")
    except OSError:
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}
        before = dict(known)
        yield known
        if known != before:
            atomic_write(store, json.dumps(known))


def file_digest(path: Path, known: dict) -> str:
    """xxh3-128 of every byte of ``path``, reused from ``known`` while its size and mtime hold."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    if key in known and known[key][:2] == stamp:
        return known[key][2]
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    known[key] = [*stamp, h.hexdigest()]
    return known[key][2]


def weights_digest(name_or_path: str | None) -> str:
    """sha256 over (file name, size, whole-file digest) of the model's files."""
    folder = local_dir(name_or_path)
    if folder is None:
        return "unresolved"
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    with _known_digests() as known:
        for path in files:
            if path.suffix in _WEIGHT_SUFFIXES:
                name = path.relative_to(folder) if folder.is_dir() else path.name
                h.update(f"{name}:{path.stat().st_size}:{file_digest(path, known)}".encode())
    return h.hexdigest()[:16]


def fingerprint(data: DataConfig, enc: EncoderConfig, repa: RepaFeatures | None = None) -> dict[str, str]:
    """Field -> value for every input of the features (all values are strings).

    ``enc.text_encoder`` None: no text features (a class-conditional stage), so no T5 field counts.
    ``repa`` (the REPA encoder's features) adds its fields; without it there are none, so a cache with
    REPA features and one without never pass for each other."""
    text = enc.text_encoder
    table = bucket_table(data.resolution) if data.multi_aspect else {"1.0": (data.resolution,) * 2}
    table_hash = hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest()[:16]
    return {
        "vae": f"{enc.vae}@{weights_digest(enc.vae)}",
        "text_encoder": f"{text}@{weights_digest(text)}" if text else "none",
        "tokenizer": f"{enc.tokenizer}@{weights_digest(enc.tokenizer)}" if text else "none",
        "resolution": str(data.resolution),
        "multi_aspect": str(data.multi_aspect),
        "buckets": table_hash,
        "max_tokens": str(enc.max_tokens) if text else "none",
        "feature_dtype": enc.feature_dtype,
        "text_feature_dtype": enc.text_feature_dtype if text else "none",
        **(repa_fields(repa) if repa is not None else {}),
        "source": repr(sorted((k, v) for k, v in asdict(data.source).items() if k not in SOURCE_PATHS)),
        "tristage_version": tristage_version(),
        "cache_format": FORMAT,
        # data.val_fraction changes which samples the training shards hold (data/val_split.py); absent at
        # 0, so caches without a split keep their fingerprint
        **({"val_fraction": str(data.val_fraction)} if data.val_fraction else {}),
    }


def repa_fields(repa: RepaFeatures) -> dict[str, str]:
    """The REPA encoder's identity (weights digest included), input resolution and stored dtype."""
    return {
        "repa_encoder": f"{repa.encoder}@{weights_digest(repa.encoder)}",
        "repa_resolution": str(repa.resolution),
        "repa_feature_dtype": repa.dtype,
    }


def first_difference(expected: dict[str, str], found: dict[str, str]) -> str | None:
    """The first field (in :func:`fingerprint`'s order) whose values differ, or None.

    Declared order, not sorted: a changed ``data.resolution`` also changes the
    derived ``buckets`` hash, and the error should name the field the user changed.
    """
    keys = list(expected) + [k for k in found if k not in expected]
    return next((k for k in keys if expected.get(k) != found.get(k)), None)
