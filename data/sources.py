"""Readers for raw image sources.

A source is split into *units* (one input tar, or a fixed-size chunk of files), the grain of
multi-process splitting and of resume: the cache pass turns each unit into one feature shard.  A unit
is known by its *key*, its name within the source: a tar's path relative to the root of the glob that
matched it (``imagenet-000001.tar`` for ``/any/mount/imagenet-*.tar``), never the spelling of that
root, so a moved or re-mounted dataset keeps its cache.  ``unit_inputs(unit)`` names the files a
unit's features depend on (its tar, plus a shared caption, metadata or synsets file) and
``unit_members(unit)`` the images of a folder chunk; ``data/identity.py`` turns them into the unit's
content identity.  Paths may be local, object-store URLs (``s3://``, ``gs://``: ``data/storage.py``)
or webdataset ``pipe:`` commands for the tar kinds.
Readers yield encoded image bytes plus labels/captions/scores and never decode
images themselves: decoding (and its failures) belongs to the cache pass.  Every
item a reader cannot use is counted in :class:`Skips` under a reason, never
silently dropped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from tristage.data import storage
from tristage.data.config import SourceConfig
from tristage.errors import SourceError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawItem:
    """One raw sample before decoding."""

    key: str  # unique, dot-free sample key
    image: bytes  # encoded image file
    caption: str | None = None  # text stages
    label: int | None = None  # stage 1 class index
    score: float | None = None  # aesthetic score


@dataclass
class Skips:
    """Items left out, by reason, with a few example keys per reason for the report; and items kept
    with a note (``noted``: e.g. ``animated_first_frame``), counted the same way."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    noted: Counter = field(default_factory=Counter)

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 20:
            self.examples[reason].append(key)

    def note(self, reason: str, key: str) -> None:
        """A kept item the summary should mention (its example keys share ``examples``)."""
        self.noted[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < 20:
            keys.append(key)

    def merge(self, other: dict) -> None:
        self.counts.update(other.get("counts", {}))
        self.noted.update(other.get("noted", {}))
        for reason, keys in other.get("examples", {}).items():
            self.examples.setdefault(reason, []).extend(keys[: 20 - len(self.examples.get(reason, []))])

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples, "noted": dict(self.noted)}


def skipped_text(manifest: dict) -> str:
    """``a=1, b=2`` for a pass's summary line, then ``; noted animated_first_frame=3`` if any was noted."""
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(manifest["skipped"].items())) or "nothing"
    noted = ", ".join(f"{r}={n}" for r, n in sorted(manifest.get("noted", {}).items()))
    return f"{skipped}; noted {noted}" if noted else skipped


@dataclass(frozen=True)
class Unit:
    """A resumable piece of a source: a tar file, or a chunk of listed files."""

    index: int  # position in the source's listing (what read() and unit_inputs() go by)
    name: str  # what the reader opens: the tar path, URL or pipe command, or "<folder>[start:end]"
    key: str = ""  # the name within the source (relative to its root): the cache's identity of the unit
    shard: int | None = None  # the feature shard it is cached in, once the cache pass placed it

    @property
    def cache_index(self) -> int:
        """The shard number: as placed by the cache pass, else the listing position."""
        return self.index if self.shard is None else self.shard


def expand(patterns: list[str]) -> list[str]:
    """Expand globs and brace-free paths in order; raise naming a pattern that matches nothing."""
    return [path for path, _ in expand_named(patterns, unique=False)]


def expand_named(patterns: list[str], unique: bool = True) -> list[tuple[str, str]]:
    """(path, name within the source) of every match, in order; raise naming a pattern that matches
    nothing, or two matches that share a name.

    The name is the path relative to the pattern's root: its leading folders up to the first glob
    character (a plain path's root is its folder).  A ``pipe:`` command is its own name; webdataset's
    brace notation expands it (``pipe:curl -s URL/shard-{000..099}.tar`` is 100 units)."""
    found: list[tuple[str, str]] = []
    for pattern in patterns:
        if storage.is_pipe(pattern):
            from braceexpand import braceexpand

            found.extend((command, command) for command in braceexpand(pattern))
            continue
        # A glob's matches exist (one listing); only a plain path is looked up (no request per match).
        globbed = any(c in pattern for c in "*?[")
        matched = storage.glob(pattern) if globbed else [pattern]
        if not matched or not (globbed or storage.exists(pattern)):
            raise SourceError(f"source path matches nothing: {pattern}")
        root = glob_root(pattern)
        found.extend((m, relative_name(m, root)) for m in matched)
    seen: dict[str, str] = {}
    for path, name in found if unique else ():
        if seen.setdefault(name, path) != path:
            raise SourceError(
                f"data.source.paths: {seen[name]} and {path} share the name {name!r} within "
                "their roots; give the files distinct names"
            )
    return found


def glob_root(pattern: str) -> str:
    """The folder a pattern's names are relative to: its leading parts without a glob character."""
    parts = pattern.rstrip("/").split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
    return "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else ".")


def relative_name(path: str, root: str) -> str:
    if storage.is_remote(path):
        return path[len(root) :].lstrip("/") if path.startswith(root) else storage.basename(path)
    return os.path.relpath(path, root)


@contextmanager
def staged(path: str) -> Iterator[str]:
    """A local file holding the tar ``path``: itself when local; an object (``s3://``...) or a ``pipe:``
    command's output is copied to a temporary file under ``TMPDIR`` first, one unit at a time per
    process, and deleted after.  The whole unit is read anyway, and a local copy can be checked
    for a clean end (:func:`_ends_cleanly`), which a stream cannot."""
    if storage.is_local(path):
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="tristage-unit-", suffix=".tar")
    os.close(fd)
    try:
        if storage.is_pipe(path):
            with wds.gopen(path, "rb") as stream, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out, 8 << 20)
        else:
            storage.download(path, Path(tmp))
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def _tar_samples(path: str, skips: Skips) -> Iterator[dict]:
    """Samples of one tar via webdataset; a truncated or corrupt tar is counted, not fatal."""
    with staged(path) as local:
        yield from _local_tar_samples(local, path, skips)


def _local_tar_samples(path: str, name: str, skips: Skips) -> Iterator[dict]:
    failed: list[Exception] = []

    def handler(exn: Exception) -> bool:
        failed.append(exn)
        skips.add("corrupt_tar", f"{name}: {type(exn).__name__}")
        return False  # stop this tar, keep what was read

    # The cache pass deals whole units to processes, so each opened tar is read whole by its owner.
    yield from wds.WebDataset(
        [path], shardshuffle=False, handler=handler, empty_check=False, nodesplitter=_own
    )
    if not failed and not _ends_cleanly(path):
        skips.add("corrupt_tar", f"{name}: truncated or damaged header")


def _ends_cleanly(path: str) -> bool:
    """True when the member headers run on to tar's zero end-of-archive block.

    tarfile ends a stream *silently* at a missing, cut or damaged header, so a tar
    cut at a member boundary would otherwise pass for a complete one.  Reads the
    headers only (seeking over the data).
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for _ in tar:
                pass
            tar.fileobj.seek(tar.offset)
            return tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError):
        return False


def _own(urls):
    """webdataset node splitter for a unit this process already owns: keep it."""
    return urls


def _image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def _text(raw: bytes, key: str, skips: Skips) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("non_utf8_text", key)
        return None


def _caption_of(raw: str | bytes | None, key: str, skips: Skips) -> str | None:
    """The stripped caption; None when it is missing, blank or not UTF-8 (counted under that reason)."""
    if isinstance(raw, bytes):
        raw = _text(raw, key, skips)
        if raw is None:
            return None
    caption = raw.strip() if isinstance(raw, str) else ""
    if not caption:
        skips.add("missing_caption", key)
        return None
    return caption


def _sample_json(sample: dict, key: str, skips: Skips) -> dict | None:
    """A webdataset sample's ``.json`` as a dict ({} when absent); None (counted) when unreadable."""
    if "json" not in sample:
        return {}
    text = _text(sample["json"], key, skips)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        skips.add("bad_json", key)
        return None
    return data


def local_folders(cfg: SourceConfig) -> list[str]:
    """The folders of a folder kind; those read files one by one, so they stay on a local or shared
    filesystem (object storage holds webdataset tars: kinds imagenet_wds, sam_llava, wds, aesthetic_wds)."""
    for i, path in enumerate(cfg.paths):
        if not storage.is_local(path):
            raise SourceError(
                f"data.source.paths[{i}]: {cfg.kind} reads local folders, not {path}; "
                "on object storage use webdataset tars (imagenet_wds, sam_llava, wds, aesthetic_wds)"
            )
    return expand(cfg.paths)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class TarUnits:
    """Sources whose units are tar files (local paths, object-store URLs or ``pipe:`` commands), each
    known by its name within the source, plus an optional shared captions file."""

    captions_path: str | None = None

    def __init__(self, cfg: SourceConfig):
        self.tars = expand_named(cfg.paths)

    def units(self) -> list[Unit]:
        return [Unit(i, path, key) for i, (path, key) in enumerate(self.tars)]

    def unit_inputs(self, unit: Unit) -> dict[str, str]:
        """Identity name -> path of the files this unit's features depend on."""
        return {unit.key: unit.name, **({"captions": self.captions_path} if self.captions_path else {})}

    def unit_members(self, unit: Unit) -> dict[str, str]:
        """A folder chunk's images (none: a tar is one file)."""
        return {}


class ImageNetWds(TarUnits):
    """ImageNet as webdataset tars: ``KEY.{jpg,png}`` + ``KEY.cls`` (class index)."""

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        for sample in _tar_samples(unit.name, skips):
            key = sample["__key__"].replace(".", "_")
            image = _image_of(sample)
            cls = _text(sample["cls"], key, skips) if "cls" in sample else ""
            if cls is None:
                continue  # already counted as non_utf8_text: one item, one reason
            if image is None or not cls.strip().isdigit():
                skips.add("missing_image_or_class", key)
                continue
            yield RawItem(key=key, image=image, label=int(cls))


def _captions_json(path: str) -> dict[str, str]:
    data = json.loads(storage.read_text(path))
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    return {str(r["id"]): r["caption"] for r in data}


def _captions_jsonl(path: str) -> dict[str, str]:
    """``{"id", "caption"}`` per line; a bad line is one error naming its own line number (each line is
    parsed alone, so json's own "line 1" would point at the wrong place)."""
    captions = {}
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[str(record["id"])] = record["caption"]
        except (ValueError, KeyError, TypeError) as err:
            raise SourceError(f"{path}:{n}: unreadable caption line ({_why(err)})") from None
    return captions


def _why(err: Exception) -> str:
    """A parse error's reason without json's line/column of the single line it was given."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg}: column {err.colno}"
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r} field"
    return f"{type(err).__name__}: {err}"


def _captions_tar(path: str) -> dict[str, bytes]:
    """A tar of per-id ``ID.txt`` files (SAM-LLaVA-Captions10M); text is decoded per item when used."""
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path)), mode="r:*") as tar:
        members = [m for m in tar if m.isfile() and m.name.endswith(".txt")]
        return {Path(m.name).stem: tar.extractfile(m).read() for m in members}


class CaptionFolder:
    """A folder of per-id ``ID.txt`` files, read lazily (millions of files: no listing up front)."""

    def __init__(self, root: str):
        self.root = root

    def get(self, key: str) -> bytes | None:
        path = storage.join(self.root, f"{key}.txt")
        return storage.read_bytes(path) if storage.exists(path) else None


CAPTION_FORMATS: dict[str, Callable[[str], dict]] = {
    ".json": _captions_json,
    ".jsonl": _captions_jsonl,
    ".tar": _captions_tar,
    ".tgz": _captions_tar,
    ".tar.gz": _captions_tar,
}


def load_captions(path: str) -> dict[str, str | bytes] | CaptionFolder:
    """LLaVA captions by image id, from any of the ways they are distributed.

    JSON (``{id: caption}`` or a list of ``{"id", "caption"}``), JSONL, a tar of
    ``ID.txt`` files, or a folder of ``ID.txt`` files.  Per-id text files stay
    bytes until used, so one non-UTF-8 caption is a counted skip, not a crash.
    """
    if storage.is_dir(path):
        return CaptionFolder(path)
    suffix = ".tar.gz" if path.endswith(".tar.gz") else Path(path).suffix
    try:
        return CAPTION_FORMATS.get(suffix, _captions_json)(path)  # other names: JSON, as before
    except SourceError:  # already one line naming the file and line
        raise
    except (ValueError, KeyError, TypeError, tarfile.TarError, EOFError) as err:
        # ValueError covers JSONDecodeError and UnicodeDecodeError of a whole JSON file.
        raise SourceError(f"{path}: unreadable caption file ({type(err).__name__}: {err})") from None


class SamLlava(TarUnits):
    """SA-1B tars (``sa_N.jpg`` + ``sa_N.json``) joined by image id with LLaVA captions (any form
    :func:`load_captions` reads).  With ``need_captions=False`` (the caption pass, which writes
    that file) every image is read, with its caption when one exists."""

    def __init__(self, cfg: SourceConfig, need_captions: bool = True):
        super().__init__(cfg)
        self.need_captions = need_captions
        if cfg.captions is None and need_captions:
            raise SourceError("data.source.captions: sam_llava needs a caption file")
        self.captions_path = expand([cfg.captions])[0] if cfg.captions is not None else None
        self.captions = {} if self.captions_path is None else load_captions(self.captions_path)

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        for sample in _tar_samples(unit.name, skips):
            key = sample["__key__"].rsplit("/", 1)[-1]
            image = _image_of(sample)
            if image is None:
                skips.add("missing_image", key)
                continue
            caption = _caption_of(self.captions.get(key), key, skips if self.need_captions else Skips())
            if caption is not None or not self.need_captions:
                yield RawItem(key=key, image=image, caption=caption)


def _above(score: object, threshold: float) -> bool:
    """A real number strictly above the threshold (None, NaN, text and bools are not)."""
    return isinstance(score, (int, float)) and not isinstance(score, bool) and score > threshold


def _metadata_jsonl(path: str) -> list[dict]:
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SourceError(f"{path}:{n}: not valid JSON") from None
    return records


def _metadata_parquet(path: str) -> list[dict]:
    """Rows of a parquet table (LAION-style metadata); only the columns the reader uses are loaded."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(
            f"{path}: parquet metadata needs pyarrow; pip install pyarrow (or tristage[parquet])"
        ) from None
    try:
        columns = [c for c in ("file", "caption", "aesthetic_score") if c in pq.read_schema(path).names]
        return pq.read_table(path, columns=columns).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for damaged files
        raise SourceError(f"{path}: unreadable parquet ({type(err).__name__}: {err})") from None


METADATA_FORMATS: dict[str, Callable[[str], list[dict]]] = {
    ".jsonl": _metadata_jsonl,
    ".parquet": _metadata_parquet,
}


class AestheticFolder:
    """An image folder with JSONL or parquet metadata: ``file``, ``caption``, ``aesthetic_score``."""

    CHUNK = 1000  # files per unit

    def __init__(self, cfg: SourceConfig, need_captions: bool = True):
        self.roots = local_folders(cfg)
        self.need_captions = need_captions  # False: images without a caption are read too
        if cfg.metadata is None:
            raise SourceError("data.source.metadata: aesthetic_folder needs a metadata JSONL or parquet")
        self.meta_path = expand([cfg.metadata])[0]
        self.min_score = cfg.min_aesthetic
        # Unknown suffixes are read as JSONL (the format's historical default here).
        self.records = METADATA_FORMATS.get(Path(self.meta_path).suffix, _metadata_jsonl)(self.meta_path)

    def units(self) -> list[Unit]:
        return [
            Unit(i, f"{self.meta_path}[{s}:{e}]", f"records[{s}:{e}]")
            for i, (s, e) in enumerate(_chunks(len(self.records), self.CHUNK))
        ]

    def unit_inputs(self, unit: Unit) -> dict[str, str]:
        return {"metadata": self.meta_path}

    def unit_members(self, unit: Unit) -> dict[str, str]:
        chunk = self.records[unit.index * self.CHUNK : (unit.index + 1) * self.CHUNK]
        found = ((r.get("file") or "", self._find(r.get("file") or "")) for r in chunk)
        return {name: str(path) for name, path in found if path is not None}

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        start = unit.index * self.CHUNK
        for record in self.records[start : start + self.CHUNK]:
            key = Path(record.get("file") or "").stem.replace(".", "_")
            score, caption = record.get("aesthetic_score"), (record.get("caption") or "").strip()
            path = self._find(record.get("file") or "")
            if not _above(score, self.min_score):
                skips.add("below_aesthetic_threshold", key)
            elif not caption and self.need_captions:
                skips.add("missing_caption", key)
            elif path is None:
                skips.add("missing_image", key)
            else:
                yield RawItem(key=key, image=path.read_bytes(), caption=caption or None, score=float(score))

    def _find(self, name: str) -> Path | None:
        for root in self.roots:
            candidate = Path(root) / name
            if name and candidate.is_file():
                return candidate
        return None


class ImageNetFolders:
    """The ILSVRC train layout, ``ROOT/nXXXXXXXX/*.JPEG``; units are chunks of the sorted file list.

    The class index of a synset is its line in ``synsets`` (the order the
    official DiT / PixArt class ids use); without a synsets file it is the
    position of the folder name in sorted order (torchvision's ImageFolder rule).
    """

    CHUNK = 1000  # files per unit

    def __init__(self, cfg: SourceConfig):
        self.roots = [Path(r) for r in local_folders(cfg)]
        folders = [d for root in self.roots for d in sorted(root.iterdir()) if d.is_dir()]
        self.index = _synset_index(cfg.synsets, folders)
        self.synsets = [cfg.synsets] if cfg.synsets else []
        self.files = [(f, d.name) for d in folders for f in sorted(d.iterdir()) if f.is_file()]

    def units(self) -> list[Unit]:
        root = self.roots[0]
        chunks = enumerate(_chunks(len(self.files), self.CHUNK))
        return [Unit(i, f"{root}[{s}:{e}]", f"files[{s}:{e}]") for i, (s, e) in chunks]

    def unit_inputs(self, unit: Unit) -> dict[str, str]:
        return {"synsets": self.synsets[0]} if self.synsets else {}

    def unit_members(self, unit: Unit) -> dict[str, str]:
        chunk = self.files[unit.index * self.CHUNK : (unit.index + 1) * self.CHUNK]
        return {f"{synset}/{path.name}": str(path) for path, synset in chunk}

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        start = unit.index * self.CHUNK
        for path, synset in self.files[start : start + self.CHUNK]:
            key = path.stem.replace(".", "_")
            if synset not in self.index:
                skips.add("unknown_synset", key)
            elif path.suffix.lower().lstrip(".") not in IMAGE_EXTS:
                skips.add("not_an_image", key)
            else:
                yield RawItem(key=key, image=path.read_bytes(), label=self.index[synset])


def _synset_index(synsets: str | None, folders: list[Path]) -> dict[str, int]:
    """Synset id -> class index: line order of the synsets file, else sorted folder names."""
    if synsets is None:
        return {name: i for i, name in enumerate(sorted({d.name for d in folders}))}
    lines = storage.read_text(synsets).splitlines()
    return {line.split()[0]: i for i, line in enumerate(lines) if line.strip()}


class Wds(TarUnits):
    """Generic captioned webdataset tars: ``KEY.{jpg,png,..}`` + ``KEY.txt``, or ``KEY.json`` whose
    ``caption`` (or ``text``) field holds the caption; ``need_captions=False`` reads uncaptioned
    images too.  A ``captions`` file (e.g. ``tristage caption``'s JSONL) replaces the tars' own
    captions, joined by sample key."""

    def __init__(self, cfg: SourceConfig, need_captions: bool = True):
        super().__init__(cfg)
        self.need_captions = need_captions
        self.captions_path = expand([cfg.captions])[0] if cfg.captions is not None else None
        self.captions = None if self.captions_path is None else load_captions(self.captions_path)

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        for sample in _tar_samples(unit.name, skips):
            key = sample["__key__"].replace("/", "_").replace(".", "_")
            meta = _sample_json(sample, key, skips)
            if meta is None or not self._wanted(meta, key, skips):
                continue
            image = _image_of(sample)
            if image is None:
                skips.add("missing_image", key)
                continue
            raw = self._raw_caption(sample, meta, key)
            caption = _caption_of(raw, key, skips if self.need_captions else Skips())
            if caption is not None or not self.need_captions:
                yield RawItem(key=key, image=image, caption=caption, score=self._score(meta))

    def _raw_caption(self, sample: dict, meta: dict, key: str) -> str | bytes | None:
        if self.captions is not None:
            return self.captions.get(key)
        return sample["txt"] if "txt" in sample else meta.get("caption", meta.get("text"))

    def _wanted(self, meta: dict, key: str, skips: Skips) -> bool:
        return True

    def _score(self, meta: dict) -> float | None:
        return None


class AestheticWds(Wds):
    """Aesthetic sets as webdataset tars: ``KEY.{jpg,png}`` + ``KEY.json`` with ``caption`` and
    ``aesthetic_score``; only images scoring above ``min_aesthetic`` are kept."""

    def __init__(self, cfg: SourceConfig, need_captions: bool = True):
        super().__init__(cfg, need_captions)
        self.min_score = cfg.min_aesthetic

    def _wanted(self, meta: dict, key: str, skips: Skips) -> bool:
        if _above(meta.get("aesthetic_score"), self.min_score):
            return True
        skips.add("below_aesthetic_threshold", key)
        return False

    def _score(self, meta: dict) -> float | None:
        return float(meta["aesthetic_score"])


Source = ImageNetWds | ImageNetFolders | SamLlava | AestheticFolder | Wds

# data.source.kind (its choices: data/config.py SOURCE_KINDS) -> the reader
SOURCES: dict[str, Callable[[SourceConfig], Source]] = {
    "imagenet_wds": ImageNetWds,
    "imagenet_folders": ImageNetFolders,
    "sam_llava": SamLlava,
    "aesthetic_folder": AestheticFolder,
    "aesthetic_wds": AestheticWds,
    "wds": Wds,
}


# Readers that can also yield images without a caption (for the caption pass).
CAPTIONED_SOURCES = ("sam_llava", "aesthetic_folder", "aesthetic_wds", "wds")


def open_source(cfg: SourceConfig, need_captions: bool = True) -> Source:
    """The reader for ``cfg.kind``; ``need_captions=False`` keeps images that have no caption yet."""
    if need_captions:
        return SOURCES[cfg.kind](cfg)
    if cfg.kind not in CAPTIONED_SOURCES:
        raise SourceError(f"data.source.kind: {cfg.kind} has class labels, not captions; nothing to caption")
    return SOURCES[cfg.kind](cfg, need_captions=False)


def listing(cfg: SourceConfig) -> Source | TarUnits:
    """The units and inputs of a source, to check a cache against: tar kinds are listed without
    reading their captions file (millions of captions are no start-up cost); folder kinds need
    their metadata to know their units."""
    if cfg.kind not in SOURCES:
        raise SourceError(f"data.source.kind: unknown source {cfg.kind!r}; known: {', '.join(SOURCES)}")
    if not issubclass(SOURCES[cfg.kind], TarUnits):
        return open_source(cfg)
    tars = TarUnits(cfg)
    tars.captions_path = expand([cfg.captions])[0] if cfg.captions is not None else None
    return tars


def class_names(cfg: SourceConfig) -> dict[int, str]:
    """Class index -> human label from the synsets file ("nXXXX label words" per line)."""
    if cfg.synsets is None:
        return {}
    lines = storage.read_text(cfg.synsets).splitlines()
    return {i: (line.split(maxsplit=1) + [line])[1].strip() for i, line in enumerate(lines) if line.strip()}
