"""The held-out validation split: which samples, where their features live, how validation reads them.

A stage gets one of two ways (``data.val_*``):

* ``data.val_fraction``: the cache pass holds out every sample whose key hashes below the fraction
  (xxh3-64 of the key, read as a share of 2**64).  The choice is a property of the sample alone: the
  same on any number of processes, in any unit order, and a sample never moves between the splits when
  the source grows.  Unit ``i``'s held-out samples go to ``CACHE/val/features-{i:05d}.tar``, written
  before the unit's training shard is marked done; the training shard never holds them.
* ``data.val_paths``: the source's own validation paths (same kind and options), cached by the same
  pass into ``CACHE/val/``.

``CACHE/val/`` is a cache folder of the same format: shards, done markers, per-sample checksums and a
``manifest.json`` with the fingerprint.  Validation reads at most ``data.val_max_samples`` of it, those
with the lowest key hashes (a fixed subset that depends on the samples only), ordered by bucket so that
each batch holds one latent shape.  See ``train/training/evaluation.py`` for what is computed on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import xxhash

from tristage.data.cache_format import (
    MANIFEST,
    CacheError,
    check_sample,
    sample_tensors,
    shard_samples,
    spend_readonly_buffer_warning,
)
from tristage.data.config import DataConfig
from tristage.data.features import _pad_text, open_manifest

VAL_DIR = "val"  # the split's cache folder inside data.cache_dir


def key_hash(key: str) -> int:
    """A sample key's 64-bit hash: decides the split and orders the samples validation reads."""
    return xxhash.xxh3_64_intdigest(key.encode())


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample ``key`` belongs to the held-out share ``fraction`` (data.val_fraction)."""
    return key_hash(key) < fraction * 2**64


def val_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / VAL_DIR


def has_split(data: DataConfig) -> bool:
    """Whether the stage's cache holds a validation split."""
    return data.val_fraction > 0 or bool(data.val_paths)


def val_source_data(data: DataConfig) -> DataConfig:
    """The data section of the ``data.val_paths`` pass: the same source kind and options over those paths,
    cached into ``CACHE/val/``."""
    source = replace(data.source, paths=list(data.val_paths))
    return replace(data, source=source, cache_dir=str(val_dir(data.cache_dir)), val_paths=[])


def split_data(data: DataConfig) -> DataConfig:
    """The data section whose fingerprint ``CACHE/val/manifest.json`` carries."""
    return val_source_data(data) if data.val_paths else data


@dataclass
class ValSample:
    """One held-out sample: its shard member bytes (mapped, not copied) and parsed metadata."""

    member: dict  # shard_samples' dict: __key__, __url__, feat.safetensors, json
    meta: dict  # the parsed json: caption or label, bucket, original size, checksum

    @property
    def key(self) -> str:
        return self.member["__key__"]


class ValSplit:
    """The validation samples of a stage, in a fixed order that depends on the samples only."""

    def __init__(
        self, data: DataConfig, expected: dict[str, str] | None, scaling_factor: float | None = None
    ):
        folder = val_dir(data.cache_dir)
        check_not_empty(folder, data)
        manifest = open_manifest(folder, expected)
        self.scaling_factor = scaling_factor or float(manifest["scaling_factor"])
        found = [ValSample(m, json.loads(bytes(m["json"]))) for m in self._members(folder, manifest)]
        chosen = sorted(found, key=lambda s: (key_hash(s.key), s.key))[: data.val_max_samples]
        self.samples = sorted(chosen, key=lambda s: (tuple(s.meta["bucket"]), key_hash(s.key), s.key))
        spend_readonly_buffer_warning()  # the tensors view the mapped shards, which are never written

    @staticmethod
    def _members(folder: Path, manifest: dict) -> list[dict]:
        members = []
        for shard in manifest["shards"]:
            members += [m for m in shard_samples(str(folder / shard["file"])) if "json" in m]
        return members

    def __len__(self) -> int:
        return len(self.samples)

    def runs(self, indices: range, size: int) -> Iterator[list[ValSample]]:
        """The samples ``indices`` in batches of at most ``size``, each of one bucket (one latent shape)."""
        batch: list[ValSample] = []
        for sample in (self.samples[i] for i in indices):
            if batch and (len(batch) == size or sample.meta["bucket"] != batch[0].meta["bucket"]):
                yield batch
                batch = []
            batch.append(sample)
        if batch:
            yield batch

    def batch(self, rows: list[ValSample]) -> dict:
        """The cached features of ``rows`` (one bucket), every checksum verified, with no condition
        dropped: mean, std (b, C, h, w) and the labels or the T5 features and micro-conditions."""
        for row in rows:
            check_sample({**row.member, "meta": row.meta})
        feats = [sample_tensors(row.member) for row in rows]
        batch = {
            "mean": torch.stack([f["mean"] for f in feats]),
            "std": torch.stack([f["std"] for f in feats]),
            "keys": [row.key for row in rows],
        }
        if "t5" not in feats[0]:
            return {**batch, "labels": torch.tensor([row.meta["label"] for row in rows])}
        text, mask = _pad_text(feats)  # (b, L, C), (b, L)
        bucket = rows[0].meta["bucket"]
        sizes = [row.meta["original_size"] for row in rows]
        return {
            **batch,
            "text": text,
            "text_mask": mask,
            "resolution": torch.tensor(sizes, dtype=torch.float32),
            "aspect_ratio": torch.full((len(rows), 1), bucket[0] / bucket[1]),
        }


def check_not_empty(folder: Path, data: DataConfig) -> None:
    """One line when the cache pass held out nothing (too small a data.val_fraction for the source)."""
    path = folder / MANIFEST
    if path.is_file() and json.loads(path.read_text())["samples"] == 0:
        raise CacheError(
            f"{path}: the validation split is empty (data.val_fraction={data.val_fraction} held out no "
            "sample); raise data.val_fraction and rerun `tristage cache`"
        )
