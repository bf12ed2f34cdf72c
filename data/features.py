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

A global batch is ``batch_size`` x processes x ``grad_accum`` samples.  With gradient accumulation
(``grad_accum`` K > 1) each global batch is yielded as K micro-batches of ``batch_size`` per process:
the process's slice cut into K consecutive pieces, so one process with K micro-batches of B sees
exactly the rows, draws and noise of one process with one batch of K x B.

The position (epoch, global batches consumed) is exposed through ``state_dict`` so the trainer can
checkpoint and resume it exactly; it moves by whole global batches.  A resume at another global batch
(other processes, ``data.batch_size`` or ``train.grad_accum``) keeps it exact too: the epoch's stream is
replayed at the saved global batch up to the position, which gives how many samples of each bucket were
consumed (a bucket's batches take its samples in stream order); the rest of the epoch skips those and
groups what is left at the new global batch.  No sample of the epoch is seen twice or left out.

The cache may sit on an object store (``data.cache_dir: s3://...``): its shards are then read through
a bounded local read-ahead copy (``data/remote_cache.py``), with the same bytes and checksums.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load as st_load

from tristage.data import storage
from tristage.data.cache_check import training_shards
from tristage.data.cache_format import (
    MANIFEST,
    CacheError,
    check_sample,
    sample_tensors,
    shard_samples,
    spend_readonly_buffer_warning,
)
from tristage.data.cache_migrate import UPGRADE_HINT, is_legacy
from tristage.data.config import DataConfig
from tristage.data.fingerprint import first_difference
from tristage.data.remote_cache import ShardCache
from tristage.data.repa_features import TENSOR as REPA_TENSOR
from tristage.data.text_codec import decode_into, decoded_dtype

log = logging.getLogger(__name__)
__all__ = ["MANIFEST", "CacheError", "FeatureLoader", "LoaderSpec", "sample_latents", "open_manifest"]


@dataclass(frozen=True)
class LoaderSpec:
    """What the loader needs besides the cache folder."""

    batch_size: int  # samples per micro-batch on each process (data.batch_size)
    grad_accum: int  # micro-batches per global batch on each process (train.grad_accum)
    rank: int  # this process
    world: int  # number of processes
    seed: int  # data order and per-batch randomness
    shuffle_buffer: int  # samples held for shuffling
    cond_dropout: float  # probability of replacing the condition with the null one
    null_label: int  # class id used as the null class (stage 1)
    pin_memory: bool = False  # page-lock batches in the prefetch thread (CUDA: copies overlap compute)
    on_damaged: str = "stop"  # a sample failing its checksum: "stop" (raise) or "skip" it and count it

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over every process and micro-batch."""
        return self.batch_size * self.world * self.grad_accum


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
    path = storage.join(str(cache_dir), MANIFEST)
    if not storage.exists(path):
        raise CacheError(f"{path}: no feature-cache manifest; run `tristage cache CONFIG` first")
    manifest = json.loads(storage.read_text(path))
    if is_legacy(manifest["fingerprint"]):
        raise CacheError(
            f"{path}: cache in the previous format ({manifest['fingerprint']['cache_format']}: raw files "
            f"recorded by path); {UPGRADE_HINT}"
        )
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
    held = set(storage.names(str(cache_dir), "*.tar"))  # one listing, not a request per shard
    for shard in manifest["shards"]:
        if shard["file"] not in held:
            raise CacheError(
                f"{storage.join(str(cache_dir), shard['file'])}: shard listed in the manifest is missing"
            )
    return manifest


def remote_shards(cache_dir: str, rank: int, data: DataConfig | None) -> ShardCache:
    """This process's read-ahead copies of a remote cache's shards (``data.remote_cache_dir``)."""
    data = data or DataConfig(cache_dir=cache_dir)
    root = Path(data.remote_cache_dir or Path(tempfile.gettempdir()) / "tristage-remote-cache")
    folder = root / xxhash.xxh3_64_hexdigest(cache_dir.encode()) / f"rank{rank}"
    return ShardCache(folder, int(data.remote_cache_gb * 2**30), storage.sizes(cache_dir, "*.tar"))


class FeatureLoader:
    """Infinite iterator of this process's slice of single-bucket global batches."""

    def __init__(
        self,
        cache_dir: str | Path,
        spec: LoaderSpec,
        expected: dict[str, str] | None = None,
        null_buffer: torch.Tensor | None = None,
        data: DataConfig | None = None,
    ):
        """``null_buffer`` (tokens, C): caption dropout uses its first L rows for a caption of L tokens,
        under that caption's mask (PixArt-alpha's ``token_drop``), instead of the cached T5("").

        ``data``: the run's data section; with it the cache is checked against the raw source (units
        missing, changed or removed: ``data.cache_check.training_shards``) and a remote cache is read
        through ``data.remote_cache_dir``."""
        self.dir, self.spec = str(cache_dir), spec
        self.manifest = open_manifest(cache_dir, expected)
        listed = self.manifest["shards"]
        if data is not None:
            keep = set(training_shards(self.manifest, self.dir, data.source, warn=spec.rank == 0))
            listed = [s for s in listed if s["file"] in keep]
        self.shards = [storage.join(self.dir, s["file"]) for s in listed]
        self.shard_samples = {storage.join(self.dir, s["file"]): int(s["samples"]) for s in listed}
        self.scaling_factor = float(self.manifest["scaling_factor"])
        null = self.manifest.get("null_caption")
        # stored tensors of T5("")
        self.null_text = st_load(storage.read_bytes(storage.join(self.dir, null))) if null else None
        self.remote = remote_shards(self.dir, spec.rank, data) if storage.is_remote(self.dir) else None
        self.null_buffer = null_buffer
        self.epoch, self.next_index = 0, 0
        # bucket -> samples of ``epoch`` consumed at another global batch (after a resume that changed it)
        self.skip: dict[tuple, int] = {}
        self.dropped: dict[int, int] = {}  # epoch -> samples left in under-full buckets
        self.damaged_skipped = 0  # samples this process left out for a failed checksum (on_damaged=skip)
        spend_readonly_buffer_warning()

    # -- position -----------------------------------------------------------------
    def state_dict(self) -> dict:
        skip = {",".join(map(str, bucket)): n for bucket, n in self.skip.items()}
        return {
            "epoch": self.epoch,
            "next_index": self.next_index,
            "global_batch": self.spec.global_batch,
            "skip": skip,
        }

    def load_state_dict(self, state: dict) -> None:
        """The saved position; saved at another global batch (``state["global_batch"]``; absent: this
        one), it becomes the samples each bucket gave so far, which the rest of the epoch skips."""
        self.epoch, self.next_index = int(state["epoch"]), int(state["next_index"])
        self.skip = {tuple(int(v) for v in k.split(",")): int(n) for k, n in state.get("skip", {}).items()}
        saved = int(state.get("global_batch", self.spec.global_batch))
        if saved != self.spec.global_batch:
            self.skip = self._consumed(saved)
            self.next_index = sum(self.skip.values())  # batches of the rest are numbered from here

    def _consumed(self, global_batch: int) -> dict[tuple, int]:
        """bucket -> samples this epoch's first ``next_index`` batches at ``global_batch`` took."""
        taken = Counter(self.skip)
        batches = self._global_batches(self.epoch, self.skip, global_batch)
        for index, samples in enumerate(batches, start=sum(self.skip.values())):
            if index >= self.next_index:
                break
            taken[tuple(samples[0]["meta"]["bucket"])] += len(samples)
        return dict(taken)

    # -- the global stream ----------------------------------------------------------
    def _order(self, epoch: int) -> list[str]:
        rng = random.Random(self.spec.seed * 1_000_003 + epoch)
        order = self.shards[:]
        rng.shuffle(order)
        return order

    def _samples(self, epoch: int) -> Iterator[dict]:
        order = self._order(epoch)
        for i, shard in enumerate(order):
            if self.remote is None:
                yield from self._read_shard(shard, shard)
                continue
            # read-ahead runs on into the next epoch's first shards
            local = self.remote.local(shard, order[i + 1 :] + self._order(epoch + 1))
            yield from self._read_shard(shard, local)

    def _read_shard(self, shard: str, local: str) -> Iterator[dict]:
        """The samples of ``shard`` (read from ``local``, its local copy for a remote cache)."""
        read = 0
        # Every rank reads the whole global stream by design (see the module docstring).
        for sample in shard_samples(local):
            sample["__url__"] = shard
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

    def _global_batches(
        self, epoch: int, skip: dict[tuple, int] | None = None, global_batch: int | None = None
    ) -> Iterator[list[dict]]:
        """Global batches, each from one bucket, in a seeded order; counts what is left over.  ``skip``:
        samples of each bucket already consumed (at another global batch), left out first."""
        size, skip = global_batch or self.spec.global_batch, Counter(skip or {})
        pending: dict[tuple, list[dict]] = defaultdict(list)
        for sample in self._shuffled(epoch):
            bucket = tuple(sample["meta"]["bucket"])
            if skip[bucket] > 0:
                skip[bucket] -= 1
                continue
            pending[bucket].append(sample)
            if len(pending[bucket]) == size:
                yield pending.pop(bucket)
        self.dropped[epoch] = sum(len(v) for v in pending.values())

    # -- one batch -----------------------------------------------------------------
    def _rows(self, micro: int) -> tuple[int, int]:
        """This process's rows of a global batch in micro-batch ``micro``: its slice, cut in order."""
        size = self.spec.batch_size
        lo = (self.spec.rank * self.spec.grad_accum + micro) * size
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
        epoch, start, skip = self.epoch, self.next_index, self.skip
        try:
            while not stop.is_set():
                produced = 0
                for index, samples in enumerate(self._global_batches(epoch, skip), start=sum(skip.values())):
                    produced += 1
                    for micro in range(self.spec.grad_accum if index >= start else 0):
                        batch = self._collate(samples, epoch, index, micro)
                        out.put(pinned(batch) if self.spec.pin_memory else batch)
                    if stop.is_set():
                        return
                if produced == 0 and not skip:  # the rest of a resumed epoch may hold no full batch
                    raise CacheError(
                        f"{self.dir}: no bucket holds a full global batch of {self.spec.global_batch}"
                    )
                epoch, start, skip = epoch + 1, 0, {}
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
                if micro == self.spec.grad_accum - 1:  # the position moves by whole global batches
                    if epoch != self.epoch:
                        self.skip = {}  # it belonged to the resumed epoch
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
