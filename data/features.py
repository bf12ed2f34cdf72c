"""The feature loader the trainer uses: cached shards -> single-bucket global batches.

Design: every process walks the same *global* stream (seeded shard order, a
seeded shuffle buffer, bucket grouping) and keeps its own slice of each global
batch.  The stream therefore depends on (seed, epoch) only -- not on the number
of processes -- which is what makes a resumed run bit-identical to an
uninterrupted one, and a 2-process run equal to a 1-process run with the same
global batch.  Only the process's own slice is decoded; shards are memory-mapped,
so the others' payloads are never even copied.  Per-batch randomness (CFG condition
dropout and the timestep draw here; the latent sample from the cached posterior and the
diffusion noise in :func:`sample_latents`, on the training device) comes from generators
seeded by (seed, epoch, batch index) and is drawn for the whole global batch, then sliced.

With gradient accumulation (``micro_batches`` K > 1) each global batch is yielded as K micro-batches
per process: the process's slice cut into K consecutive pieces, so one process with K micro-batches
of B sees exactly the rows, draws and noise of one process with one batch of K x B.

The position (epoch, global batches consumed) is exposed through ``state_dict`` so the trainer can
checkpoint and resume it exactly; it moves by whole global batches.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tristage.data.cache_format import (
    MANIFEST,
    CacheError,
    check_sample,
    sample_tensors,
    shard_samples,
    spend_readonly_buffer_warning,
)
from tristage.data.fingerprint import first_difference
from tristage.data.repa_features import TENSOR as REPA_TENSOR
from tristage.data.text_codec import decode_into, decoded_dtype

log = logging.getLogger(__name__)
__all__ = ["MANIFEST", "CacheError", "FeatureLoader", "LoaderSpec", "sample_latents", "open_manifest"]


@dataclass(frozen=True)
class LoaderSpec:
    """What the loader needs besides the cache folder."""

    global_batch: int  # samples per optimizer step across all processes and micro-batches
    rank: int  # this process
    world: int  # number of processes
    seed: int  # data order and per-batch randomness
    shuffle_buffer: int  # samples held for shuffling
    cond_dropout: float  # probability of replacing the condition with the null one
    null_label: int  # class id used as the null class (stage 1)
    pin_memory: bool = False  # page-lock batches in the prefetch thread (CUDA: copies overlap compute)
    on_damaged: str = "stop"  # a sample failing its checksum: "stop" (raise) or "skip" it and count it
    micro_batches: int = 1  # batches yielded per global batch on each process (train.grad_accum)


@dataclass(frozen=True)
class NoiseDraw:
    """What :func:`sample_latents` needs to draw one batch's Gaussian noise where it is used."""

    seed: int  # per (seed, epoch, batch index)
    lo: int  # this process's rows of the global batch
    hi: int
    global_batch: int
    scaling_factor: float  # the VAE's latent scale
    skipped: tuple[int, ...] = ()  # rows of lo:hi dropped as damaged (data.on_damaged=skip)


def sample_latents(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, diffusion noise) of a loader batch, drawn on ``device``.

    The latent is sampled from the cached posterior, ``(mean + std * eps) * scaling_factor``.
    Both Gaussian draws are made for the whole global batch from a generator seeded per batch,
    then sliced to this process's rows: the same numbers on any number of processes, and on a
    GPU the host neither generates nor copies them (the loader ships only the cached bytes).
    """
    draw: NoiseDraw = batch["noise_draw"]
    g = torch.Generator(device).manual_seed(draw.seed)
    shape = (draw.global_batch, *batch["mean"].shape[1:])
    eps = torch.randn(shape, generator=g, device=device)[draw.lo : draw.hi]
    noise = torch.randn(shape, generator=g, device=device)[draw.lo : draw.hi]
    if draw.skipped:  # the same draws as without the damage, less the dropped rows
        keep = [i for i in range(draw.hi - draw.lo) if i not in draw.skipped]
        eps, noise = eps[keep], noise[keep]
    mean, std = batch["mean"].to(device).float(), batch["std"].to(device).float()
    return (mean + std * eps) * draw.scaling_factor, noise


def open_manifest(cache_dir: str | Path, expected: dict[str, str] | None) -> dict:
    """Read and check ``manifest.json``: fingerprint, shard files present and non-empty."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: no feature-cache manifest; run `tristage cache CONFIG` first")
    manifest = json.loads(path.read_text())
    if expected is not None:
        diff = first_difference(expected, manifest["fingerprint"])
        if diff is not None:
            found, wanted = manifest["fingerprint"].get(diff), expected.get(diff)
            raise CacheError(
                f"{path}: cache fingerprint disagrees with the config on '{diff}' "
                f"(cache: {found!r}, config: {wanted!r}); re-run the cache"
            )
    if not manifest["shards"] or manifest["samples"] == 0:
        raise CacheError(f"{path}: the cache lists no samples")
    for shard in manifest["shards"]:
        if not (Path(cache_dir) / shard["file"]).is_file():
            raise CacheError(f"{Path(cache_dir) / shard['file']}: shard listed in the manifest is missing")
    return manifest


class FeatureLoader:
    """Infinite iterator of this process's slice of single-bucket global batches."""

    def __init__(
        self,
        cache_dir: str | Path,
        spec: LoaderSpec,
        expected: dict[str, str] | None = None,
        null_buffer: torch.Tensor | None = None,
    ):
        """``null_buffer`` (tokens, C): caption dropout uses its first L rows for a caption of L tokens,
        under that caption's mask (PixArt-alpha's ``token_drop``), instead of the cached T5("")."""
        if spec.global_batch % (spec.world * spec.micro_batches):
            raise ValueError(
                f"global batch {spec.global_batch} is not divisible by {spec.world} processes "
                f"x {spec.micro_batches} micro-batches"
            )
        self.dir, self.spec = Path(cache_dir), spec
        self.manifest = open_manifest(cache_dir, expected)
        self.shards = [str(self.dir / s["file"]) for s in self.manifest["shards"]]
        self.shard_samples = {str(self.dir / s["file"]): int(s["samples"]) for s in self.manifest["shards"]}
        self.scaling_factor = float(self.manifest["scaling_factor"])
        null = self.manifest.get("null_caption")
        self.null_text = load_file(self.dir / null) if null else None  # stored tensors of T5("")
        self.null_buffer = null_buffer
        self.epoch, self.next_index = 0, 0
        self.dropped: dict[int, int] = {}  # epoch -> samples left in under-full buckets
        self.damaged_skipped = 0  # samples this process left out for a failed checksum (on_damaged=skip)
        spend_readonly_buffer_warning()

    # -- position -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_index = int(state["epoch"]), int(state["next_index"])

    # -- the global stream ----------------------------------------------------------
    def _samples(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(self.spec.seed * 1_000_003 + epoch)
        order = self.shards[:]
        rng.shuffle(order)
        for shard in order:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: str) -> Iterator[dict]:
        read = 0
        # Every rank reads the whole global stream by design (see the module docstring).
        for sample in shard_samples(shard):
            if "json" not in sample or "feat.safetensors" not in sample:
                raise CacheError(f"{shard}: sample {sample.get('__key__')!r} lacks json or features")
            try:
                sample["meta"] = json.loads(bytes(sample["json"]))
            except ValueError as exn:
                raise CacheError(
                    f"{shard}: corrupt feature shard (sample {sample['__key__']!r}: {exn})"
                ) from None
            read += 1
            yield sample
        # tarfile ends a stream silently at a damaged header, so count against the manifest.
        if read != self.shard_samples[shard]:
            raise CacheError(
                f"{shard}: corrupt feature shard (read {read} of the {self.shard_samples[shard]} samples "
                "the manifest lists)"
            )

    def _shuffled(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(self.spec.seed * 7_919 + epoch)
        buffer: list[dict] = []
        for sample in self._samples(epoch):
            buffer.append(sample)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _global_batches(self, epoch: int) -> Iterator[list[dict]]:
        """Global batches, each from one bucket, in a seeded order; counts what is left over."""
        pending: dict[tuple, list[dict]] = defaultdict(list)
        for sample in self._shuffled(epoch):
            bucket = tuple(sample["meta"]["bucket"])
            pending[bucket].append(sample)
            if len(pending[bucket]) == self.spec.global_batch:
                yield pending.pop(bucket)
        self.dropped[epoch] = sum(len(v) for v in pending.values())

    # -- one batch -----------------------------------------------------------------
    def _rows(self, micro: int) -> tuple[int, int]:
        """This process's rows of a global batch in micro-batch ``micro``: its slice, cut in order."""
        per_rank = self.spec.global_batch // self.spec.world
        size = per_rank // self.spec.micro_batches
        lo = self.spec.rank * per_rank + micro * size
        return lo, lo + size

    def _collate(self, samples: list[dict], epoch: int, index: int, micro: int = 0) -> dict:
        """This process's slice of a global batch, every row's checksum verified before it is handed on.

        The check runs after the batch is built: the copies leave each payload in the CPU cache, where
        hashing it costs a third of a cold read (bench/cache.py).  A damaged row raises, or is left out
        and the slice rebuilt (``on_damaged="skip"``)."""
        lo, hi = self._rows(micro)
        rows = list(range(lo, hi))
        try:
            batch = self._build(samples, rows, (epoch, index, micro))
        except CacheError:  # a payload too damaged to decode: let the checksums name it
            batch = None
        intact = self._intact_rows(samples, rows)
        if batch is None or intact != rows:
            batch = self._build(samples, intact, (epoch, index, micro))
        return batch

    def _build(self, samples: list[dict], rows: list[int], position: tuple[int, int, int]) -> dict:
        epoch, index, micro = position
        seed = (self.spec.seed * 1_000_003 + epoch) * 1_000_033 + index
        g = torch.Generator().manual_seed(seed)
        n, (lo, hi) = self.spec.global_batch, self._rows(micro)
        feats = [sample_tensors(samples[r]) for r in rows]
        u = torch.rand(n, generator=g)[rows]  # timestep draw in [0, 1)
        drop = (torch.rand(n, generator=g) < self.spec.cond_dropout)[rows]
        metas = [samples[r]["meta"] for r in rows]
        skipped = tuple(r - lo for r in range(lo, hi) if r not in rows)
        batch = {
            "mean": torch.stack([f["mean"] for f in feats]),  # (b, C, h, w), cached dtype
            "std": torch.stack([f["std"] for f in feats]),
            "noise_draw": NoiseDraw(seed, lo, hi, n, self.scaling_factor, skipped),
            "u": u,
            "keys": [m["key"] for m in metas],
            "position": position,
        }
        if REPA_TENSOR in feats[0]:  # objective.repa: the encoder's patch features, (b, h, w, D) cached dtype
            batch["repa"] = torch.stack([f[REPA_TENSOR] for f in feats])
        batch.update(self._conditions(feats, metas, drop))
        return batch

    def _intact_rows(self, samples: list[dict], rows: list[int]) -> list[int]:
        """The rows whose checksums hold; a damaged one raises, or with ``on_damaged="skip"`` is left
        out and counted (one line each, naming shard and key)."""
        intact = []
        for row in rows:
            try:
                check_sample(samples[row])
                intact.append(row)
            except CacheError as err:
                if self.spec.on_damaged != "skip":
                    raise
                log.warning("%s; skipped (data.on_damaged=skip)", err)
        if not intact:
            raise CacheError(f"{self.dir}: every sample of this process's slice of a batch is damaged")
        return intact

    def _conditions(self, feats: list[dict], metas: list[dict], drop: torch.Tensor) -> dict:
        if "t5" not in feats[0]:
            labels = torch.tensor([m["label"] for m in metas])
            return {"labels": torch.where(drop, torch.full_like(labels, self.spec.null_label), labels)}
        texts = [self._null(f) if d else f for f, d in zip(feats, drop.tolist())]
        text, mask = _pad_text(texts)  # (b, L, C) in the cached width, (b, L)
        bucket = metas[0]["bucket"]
        return {
            "text": text,
            "text_mask": mask,
            "resolution": torch.tensor([m["original_size"] for m in metas], dtype=torch.float32),
            "aspect_ratio": torch.full((len(metas), 1), bucket[0] / bucket[1]),
        }

    def _null(self, feature: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.null_buffer is None:
            return self.null_text
        return {"t5": self.null_buffer[: feature["t5"].shape[0]].to(decoded_dtype(feature))}

    # -- iteration -----------------------------------------------------------------
    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        epoch, start = self.epoch, self.next_index
        try:
            while not stop.is_set():
                produced = 0
                for index, samples in enumerate(self._global_batches(epoch)):
                    produced += 1
                    for micro in range(self.spec.micro_batches if index >= start else 0):
                        batch = self._collate(samples, epoch, index, micro)
                        out.put(pinned(batch) if self.spec.pin_memory else batch)
                    if stop.is_set():
                        return
                if produced == 0:
                    raise CacheError(
                        f"{self.dir}: no bucket holds a full global batch of {self.spec.global_batch}"
                    )
                epoch, start = epoch + 1, 0
        except BaseException as exn:  # hand every failure to the consumer thread
            out.put(exn)

    def __iter__(self) -> Iterator[dict]:
        out: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                epoch, index, micro = item["position"]
                if micro == self.spec.micro_batches - 1:  # the position moves by whole global batches
                    self.epoch, self.next_index = epoch, index + 1
                self.damaged_skipped += len(item["noise_draw"].skipped)  # counted as used, not as prefetched
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def _pad_text(stored: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (L_i, C) features -> (b, L, C) zero-padded to the longest, and the float (b, L) mask.

    The batch keeps the cached width (bf16 for bf16 and fp8 caches): at T5-XXL width it is
    tens of MB, and one copy of each row in its stored width -- zeros only in the padding --
    is the whole of the loader's cost.  The model casts it on the device.
    """
    length = max(s["t5"].shape[0] for s in stored)
    text = torch.empty(len(stored), length, stored[0]["t5"].shape[1], dtype=decoded_dtype(stored[0]))
    mask = torch.zeros(len(stored), length)
    for i, s in enumerate(stored):
        n = s["t5"].shape[0]
        decode_into(s, text[i, :n])
        text[i, n:].zero_()
        mask[i, :n] = 1
    return text, mask


def pinned(batch: dict) -> dict:
    """The batch with its tensors in page-locked memory, so ``.to(cuda, non_blocking=True)`` is async."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
