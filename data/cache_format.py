"""The feature-cache format, in one place: file names, the manifest, sample checksums, the shard
reader and the zero-copy tensor views.  Written by ``data/cache.py``, read by ``data/features.py``
(and by export, for the class names).

A cache folder holds::

    manifest.json                  fingerprint, shard list (file, samples, unit key, unit identity),
                                   counts, scaling factor (written last)
    features-NNNNN.tar             one webdataset shard per raw source unit
    features-NNNNN.done.json       a shard's completeness marker, written after the shard: counts,
                                   skips, the fingerprint, the unit's key (its name within the
                                   source) and its content identity (``data/identity.py``)
    null_caption.safetensors       T5("") for caption dropout (text stages)
    validation_prompts.safetensors T5 features of validation.prompts and "" (text stages)
    skipped.json                   every skipped raw item, by reason

Per sample a shard holds ``KEY.feat.safetensors`` (tensors) and ``KEY.json`` (metadata).  The
json's last field, ``checksum``, is xxh3-64 over the safetensors payload followed by the json
text *without* that field (``json.dumps`` of the rest, which reproduces the written bytes).  The
loader checks it for every sample it decodes, before the batch reaches the trainer, so a flipped
bit in the tensors or the metadata is caught where it would be used.  xxh3 is not a cryptographic
hash: it detects storage and transfer damage, not deliberate forgery.  The loader hashes a payload
right after copying it into the batch, while it is in the CPU cache: ~18 us for a 256 px sample with
bf16 T5-XXL features (674 KB) against ~60 us cold (``tristage bench cache``).
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from collections.abc import Iterator

import torch
import xxhash

from tristage.errors import CacheError

MANIFEST = "manifest.json"
NULL_CAPTION = "null_caption.safetensors"
SKIPPED = "skipped.json"
VALIDATION_PROMPTS = "validation_prompts.safetensors"  # T5 features of validation.prompts and of ""
# v2: per-sample checksums; v3: units recorded by key and content identity (shards are as in v2, so a
# v2 folder is upgraded in place by ``tristage cache``: data/cache_migrate.py).  Part of the fingerprint.
FORMAT = "tristage-features-v3"
LEGACY_FORMATS = ("tristage-features-v2",)  # upgraded in place, never re-encoded
CHECKSUM = "checksum"  # the json field holding a sample's digest

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
}


def shard_name(index: int) -> str:
    return f"features-{index:05d}.tar"


def done_marker_name(shard: str) -> str:
    """``features-NNNNN.tar`` -> ``features-NNNNN.done.json`` (also of a full path or URL)."""
    return shard.replace(".tar", ".done.json")


def sample_json(meta: dict, feat: bytes) -> bytes:
    """The ``KEY.json`` member of a sample: its metadata with the checksum as last field."""
    return json.dumps({**meta, CHECKSUM: _digest(feat, json.dumps(meta))}).encode()


def _digest(feat, meta_text: str) -> str:
    h = xxhash.xxh3_64(feat)
    h.update(meta_text.encode())
    return h.hexdigest()


def check_sample(sample: dict) -> None:
    """Raise :class:`CacheError` naming the shard and key unless the sample matches its checksum.

    ``sample["meta"]`` is the parsed json (the loader parses it for every sample to bucket it)."""
    meta = dict(sample["meta"])
    stored = meta.pop(CHECKSUM, None)
    if stored != _digest(sample["feat.safetensors"], json.dumps(meta)):
        what = "has no checksum" if stored is None else "fails its checksum"
        raise CacheError(
            f"{sample['__url__']}: damaged cached sample {sample['__key__']!r} ({what}; "
            "the shard's bytes changed after the cache pass wrote them)"
        )


def shard_samples(shard: str) -> Iterator[dict]:
    """The webdataset samples of one local shard, payloads as zero-copy views of the mapped file.

    Same grouping as webdataset (key = member path up to the first dot of its file name), but
    webdataset's streaming tar reader copies every payload three times in 10 KiB pieces, and
    ``tarfile`` spends ~60 us of Python per member on headers -- at T5-XXL width those were
    most of the loader's time.  Here :func:`tar_members` reads only the 512-byte headers; a
    payload's pages are touched once, when its batch is built.
    """
    try:
        with open(shard, "rb") as fh:
            data = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as exn:  # ValueError: mmap of an empty file
        raise CacheError(f"{shard}: corrupt feature shard ({type(exn).__name__}: {exn})") from None
    try:
        members = list(tar_members(data, shard))
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


def tar_members(data: memoryview, shard: str) -> Iterator[tuple[str, int, int]]:
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


def sample_tensors(sample: dict) -> dict[str, torch.Tensor]:
    """The tensors of one cached sample; a damaged payload names its shard."""
    try:
        return safetensors_views(sample["feat.safetensors"])
    except Exception as exn:  # any inconsistency in the bytes means a damaged payload
        raise CacheError(
            f"{sample.get('__url__')}: corrupt feature shard (sample {sample.get('__key__')!r}: {exn})"
        ) from None


def spend_readonly_buffer_warning() -> None:
    """Cached features are read through zero-copy views of the read-only tar member bytes, which
    the loader never writes.  torch warns about such views once per process; spend that warning
    here, quietly and in the constructing thread, so it neither shows up as noise nor -- under
    ``-W error`` -- turns into a failure inside the prefetch thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


def safetensors_views(data: bytes) -> dict[str, torch.Tensor]:
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
