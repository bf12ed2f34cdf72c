"""Fingerprint of everything that changes cached features.

The cache pass stores it in ``manifest.json``; the trainer recomputes it from
its own config and refuses a cache that disagrees, naming the first differing
field.  Weight digests read only file sizes and the first and last MiB of each
weight file, so checking a T5-XXL cache at start-up costs milliseconds, yet any
re-download, fine-tune or swap of the encoder changes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tristage.data.buckets import bucket_table
from tristage.train.config import Config

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
_MIB = 1 << 20


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


def weights_digest(name_or_path: str | None) -> str:
    """sha256 over (file name, size, first MiB, last MiB) of the model's files."""
    folder = local_dir(name_or_path)
    if folder is None:
        return "unresolved"
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        if path.suffix not in _WEIGHT_SUFFIXES:
            continue
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder) if folder.is_dir() else path.name}:{size}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(_MIB))
            fh.seek(max(0, size - _MIB))
            h.update(fh.read(_MIB))
    return h.hexdigest()[:16]


def fingerprint(cfg: Config) -> dict[str, str]:
    """Field -> value for every input of the features (all values are strings)."""
    enc, data = cfg.encoders, cfg.data
    text = enc.text_encoder if cfg.model.family != "dit" else None
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
        "source": repr(sorted(asdict(data.source).items())),
        "tristage_version": tristage_version(),
    }


def first_difference(expected: dict[str, str], found: dict[str, str]) -> str | None:
    """The first field (in :func:`fingerprint`'s order) whose values differ, or None.

    Declared order, not sorted: a changed ``data.resolution`` also changes the
    derived ``buckets`` hash, and the error should name the field the user changed.
    """
    keys = list(expected) + [k for k in found if k not in expected]
    return next((k for k in keys if expected.get(k) != found.get(k)), None)
