"""Readers for raw image sources.

A source is split into *units* (one input tar, or a fixed-size chunk of files).
The cache pass turns unit ``i`` into feature shard ``i``, so units are the grain
of multi-process splitting and of resume.  Readers yield encoded image bytes plus
labels/captions/scores and never decode images themselves: decoding (and its
failures) belongs to the cache pass.  Every item a reader cannot use is counted
in :class:`Skips` under a reason, never silently dropped.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from train.config import SourceConfig

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
    """Items left out, by reason, with a few example keys per reason for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 20:
            self.examples[reason].append(key)

    def merge(self, other: dict) -> None:
        self.counts.update(other.get("counts", {}))
        for reason, keys in other.get("examples", {}).items():
            self.examples.setdefault(reason, []).extend(keys[: 20 - len(self.examples.get(reason, []))])

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}


@dataclass(frozen=True)
class Unit:
    """A resumable piece of a source: a tar file, or a chunk of listed files."""

    index: int
    name: str  # the tar path, or "<folder>[start:end]"


class SourceError(ValueError):
    """A source that cannot be read at all (missing files, bad metadata); names the path."""


def expand(patterns: list[str]) -> list[str]:
    """Expand globs and brace-free paths in order; raise naming a pattern that matches nothing."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matched or not all(Path(m).exists() for m in matched):
            raise SourceError(f"source path matches nothing: {pattern}")
        files.extend(matched)
    return files


def _tar_samples(path: str, skips: Skips) -> Iterator[dict]:
    """Samples of one tar via webdataset; a truncated or corrupt tar is counted, not fatal."""
    failed: list[Exception] = []

    def handler(exn: Exception) -> bool:
        failed.append(exn)
        skips.add("corrupt_tar", f"{path}: {type(exn).__name__}")
        return False  # stop this tar, keep what was read

    # The cache pass deals whole units to processes, so each opened tar is read whole by its owner.
    yield from wds.WebDataset(
        [path], shardshuffle=False, handler=handler, empty_check=False, nodesplitter=_own
    )
    if not failed and not _ends_cleanly(path):
        skips.add("corrupt_tar", f"{path}: truncated or damaged header")


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


class ImageNetWds:
    """ImageNet as webdataset tars: ``KEY.{jpg,png}`` + ``KEY.cls`` (class index)."""

    def __init__(self, cfg: SourceConfig):
        self.tars = expand(cfg.paths)

    def units(self) -> list[Unit]:
        return [Unit(i, t) for i, t in enumerate(self.tars)]

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


def load_captions(path: str) -> dict[str, str]:
    """LLaVA captions as JSON (``{id: caption}`` or a list of records) or JSONL (``{"id", "caption"}``)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {str(r["id"]): r["caption"] for r in records}
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): v for k, v in data.items()}
        return {str(r["id"]): r["caption"] for r in data}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SourceError(f"{path}: unreadable caption file ({type(err).__name__}: {err})") from None


class SamLlava:
    """SA-1B tars (``sa_N.jpg`` + ``sa_N.json``) joined by image id with LLaVA captions."""

    def __init__(self, cfg: SourceConfig):
        self.tars = expand(cfg.paths)
        if cfg.captions is None:
            raise SourceError("data.source.captions: sam_llava needs a caption file")
        self.captions = load_captions(expand([cfg.captions])[0])

    def units(self) -> list[Unit]:
        return [Unit(i, t) for i, t in enumerate(self.tars)]

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        for sample in _tar_samples(unit.name, skips):
            key = sample["__key__"].rsplit("/", 1)[-1]
            image = _image_of(sample)
            caption = (self.captions.get(key) or "").strip()
            if image is None:
                skips.add("missing_image", key)
            elif not caption:
                skips.add("missing_caption", key)
            else:
                yield RawItem(key=key, image=image, caption=caption)


class AestheticFolder:
    """An image folder with JSONL metadata: ``file``, ``caption``, ``aesthetic_score``."""

    CHUNK = 1000  # files per unit

    def __init__(self, cfg: SourceConfig):
        self.roots = expand(cfg.paths)
        if cfg.metadata is None:
            raise SourceError("data.source.metadata: aesthetic_folder needs a metadata JSONL")
        self.meta_path = expand([cfg.metadata])[0]
        self.min_score = cfg.min_aesthetic
        self.records = self._records()

    def _records(self) -> list[dict]:
        records = []
        for n, line in enumerate(Path(self.meta_path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SourceError(f"{self.meta_path}:{n}: not valid JSON") from None
        return records

    def units(self) -> list[Unit]:
        return [
            Unit(i, f"{self.meta_path}[{s}:{s + self.CHUNK}]")
            for i, s in enumerate(range(0, len(self.records), self.CHUNK))
        ]

    def read(self, unit: Unit, skips: Skips) -> Iterator[RawItem]:
        start = unit.index * self.CHUNK
        for record in self.records[start : start + self.CHUNK]:
            key = Path(record.get("file", "")).stem.replace(".", "_")
            score, caption = record.get("aesthetic_score"), (record.get("caption") or "").strip()
            path = self._find(record.get("file", ""))
            if score is None or score <= self.min_score:
                skips.add("below_aesthetic_threshold", key)
            elif not caption:
                skips.add("missing_caption", key)
            elif path is None:
                skips.add("missing_image", key)
            else:
                yield RawItem(key=key, image=path.read_bytes(), caption=caption, score=float(score))

    def _find(self, name: str) -> Path | None:
        for root in self.roots:
            candidate = Path(root) / name
            if name and candidate.is_file():
                return candidate
        return None


SOURCES: dict[str, Callable[[SourceConfig], ImageNetWds | SamLlava | AestheticFolder]] = {
    "imagenet_wds": ImageNetWds,
    "sam_llava": SamLlava,
    "aesthetic_folder": AestheticFolder,
}


def open_source(cfg: SourceConfig):
    """The reader for ``cfg.kind``."""
    if cfg.kind not in SOURCES:
        raise SourceError(f"data.source.kind: unknown source {cfg.kind!r}; known: {', '.join(SOURCES)}")
    return SOURCES[cfg.kind](cfg)


def class_names(cfg: SourceConfig) -> dict[int, str]:
    """Class index -> human label from the synsets file ("nXXXX label words" per line)."""
    if cfg.synsets is None:
        return {}
    lines = Path(cfg.synsets).read_text(encoding="utf-8").splitlines()
    return {i: (line.split(maxsplit=1) + [line])[1].strip() for i, line in enumerate(lines) if line.strip()}
