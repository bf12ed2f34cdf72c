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

The position (epoch, batches consumed) is exposed through ``state_dict`` so the
trainer can checkpoint and resume it exactly.
"""

from __future__ import annotations

import json
import math
import mmap
import queue
import random
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tristage.data.fingerprint import first_difference
from tristage.data.text_codec import decode_into, decoded_dtype

MANIFEST = "manifest.json"
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
}


class CacheError(ValueError):
    """A feature cache that cannot be used; the message names the file or shard."""


@dataclass(frozen=True)
class LoaderSpec:
    """What the loader needs besides the cache folder."""

    global_batch: int  # samples per optimizer micro-step across all processes
    rank: int  # this process
    world: int  # number of processes
    seed: int  # data order and per-batch randomness
    shuffle_buffer: int  # samples held for shuffling
    cond_dropout: float  # probability of replacing the condition with the null one
    null_label: int  # class id used as the null class (stage 1)
    pin_memory: bool = False  # page-lock batches in the prefetch thread (CUDA: copies overlap compute)


@dataclass(frozen=True)
class NoiseDraw:
    """What :func:`sample_latents` needs to draw one batch's Gaussian noise where it is used."""

    seed: int  # per (seed, epoch, batch index)
    lo: int  # this process's rows of the global batch
    hi: int
    global_batch: int
    scaling_factor: float  # the VAE's latent scale


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
        if spec.global_batch % spec.world:
            raise ValueError(f"global batch {spec.global_batch} is not divisible by {spec.world} processes")
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
        _spend_readonly_buffer_warning()

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
        for sample in _shard_samples(shard):
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
    def _collate(self, samples: list[dict], epoch: int, index: int) -> dict:
        seed = (self.spec.seed * 1_000_003 + epoch) * 1_000_033 + index
        g = torch.Generator().manual_seed(seed)
        n = self.spec.global_batch
        lo, hi = self.spec.rank * n // self.spec.world, (self.spec.rank + 1) * n // self.spec.world
        feats = [_features(s) for s in samples[lo:hi]]
        u = torch.rand(n, generator=g)[lo:hi]  # timestep draw in [0, 1)
        drop = (torch.rand(n, generator=g) < self.spec.cond_dropout)[lo:hi]
        metas = [s["meta"] for s in samples[lo:hi]]
        batch = {
            "mean": torch.stack([f["mean"] for f in feats]),  # (b, C, h, w), cached dtype
            "std": torch.stack([f["std"] for f in feats]),
            "noise_draw": NoiseDraw(seed, lo, hi, n, self.scaling_factor),
            "u": u,
            "keys": [m["key"] for m in metas],
            "position": (epoch, index),
        }
        batch.update(self._conditions(feats, metas, drop))
        return batch

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
                    if index >= start:
                        batch = self._collate(samples, epoch, index)
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
                self.epoch, self.next_index = item["position"][0], item["position"][1] + 1
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def _shard_samples(shard: str) -> Iterator[dict]:
    """The webdataset samples of one local shard, payloads as zero-copy views of the mapped file.

    Same grouping as webdataset (key = member path up to the first dot of its file name), but
    webdataset's streaming tar reader copies every payload three times in 10 KiB pieces, and
    ``tarfile`` spends ~60 us of Python per member on headers -- at T5-XXL width those were
    most of the loader's time.  Here :func:`_tar_members` reads only the 512-byte headers; a
    payload's pages are touched once, when its batch is built.
    """
    try:
        with open(shard, "rb") as fh:
            data = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as exn:  # ValueError: mmap of an empty file
        raise CacheError(f"{shard}: corrupt feature shard ({type(exn).__name__}: {exn})") from None
    try:
        members = list(_tar_members(data, shard))
    except CacheError:
        raise
    except ValueError as exn:  # a pax record or a name that does not parse
        raise CacheError(f"{shard}: corrupt feature shard (bad tar header: {exn})") from None
    sample: dict = {}
    for name, offset, size in members:
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample = sample or {"__key__": key, "__url__": shard}
        sample[ext.lower()] = data[offset : offset + size]
    if sample:
        yield sample


_BLOCK = 512
_REGULAR = (b"0", b"\0")  # tar type flags of a regular file


def _tar_members(data: memoryview, shard: str) -> Iterator[tuple[str, int, int]]:
    """(name, payload offset, size) of each regular file of an in-memory tar (POSIX ustar, with pax
    ``path``/``size`` records and GNU long names).  Every header's checksum is verified; a
    damaged header or a member cut short raises :class:`CacheError` naming the shard.
    """
    pos, override = 0, {}
    while pos + _BLOCK <= len(data):
        header = bytes(data[pos : pos + _BLOCK])
        if not any(header):  # end-of-archive marker
            return
        size = int(override.get("size", _tar_number(header[124:136], shard, pos)))
        start, kind = pos + _BLOCK, header[156:157]
        if _tar_checksum(header) != _tar_number(header[148:156], shard, pos):
            raise CacheError(f"{shard}: corrupt feature shard (bad tar header checksum at byte {pos})")
        if start + size > len(data):
            raise CacheError(f"{shard}: corrupt feature shard (member at byte {pos} is cut short)")
        if kind == b"x":  # pax extended header: applies to the next member
            override = _pax_records(bytes(data[start : start + size]))
        elif kind == b"L":  # GNU long name: applies to the next member
            override = {"path": bytes(data[start : start + size]).rstrip(b"\0").decode("utf-8")}
        else:
            if kind in _REGULAR:
                yield override.get("path") or _tar_name(header), start, size
            override = {}
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _tar_number(field: bytes, shard: str, pos: int) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise CacheError(f"{shard}: corrupt feature shard (bad tar header at byte {pos})") from None


def _tar_checksum(header: bytes) -> int:
    """The ustar checksum: the header's byte sum with the checksum field read as spaces."""
    return sum(header) - sum(header[148:156]) + 8 * ord(" ")


def _tar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(payload: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(payload):
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


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


def _features(sample: dict) -> dict[str, torch.Tensor]:
    """The tensors of one cached sample; a damaged payload names its shard."""
    try:
        return _safetensors_views(sample["feat.safetensors"])
    except Exception as exn:  # any inconsistency in the bytes means a damaged payload
        raise CacheError(
            f"{sample.get('__url__')}: corrupt feature shard (sample {sample.get('__key__')!r}: {exn})"
        ) from None


def _spend_readonly_buffer_warning() -> None:
    """Cached features are read through zero-copy views of the read-only tar member bytes, which
    the loader never writes.  torch warns about such views once per process; spend that warning
    here, quietly and in the constructing thread, so it neither shows up as noise nor -- under
    ``-W error`` -- turns into a failure inside the prefetch thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


def _safetensors_views(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors that *view* them (``safetensors.torch.load`` copies every byte).

    Format (https://github.com/huggingface/safetensors#format): u64 little-endian header size, a
    JSON header ``{name: {dtype, shape, data_offsets}}``, then the data.  Every offset and size is
    checked, so a damaged payload raises instead of yielding wrong numbers.
    """
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("header size runs past the payload")
    header, body = json.loads(bytes(data[8 : 8 + size])), memoryview(data)[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: offsets {start}:{end} do not fit {shape} {info['dtype']}")
        count = (end - start) // dtype.itemsize
        view = (
            torch.frombuffer(body, dtype=dtype, count=count, offset=start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        out[name] = view.view(shape)
    return out
