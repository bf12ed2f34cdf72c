"""The caching pass: frozen VAE + T5 over raw source units -> webdataset feature shards + manifest.

Each source unit ``i`` becomes ``features-{i:05d}.tar``.  Units are dealt to
processes round-robin (``i % world == rank``), so no two processes ever write
the same file.  A shard is written under a temporary name, fsynced, renamed, and
only then marked complete by ``features-{i:05d}.done.json`` (counts, skips, the
writer's rank, the fingerprint and the raw files' stamps).  A rerun skips units that
carry a done marker and first deletes the ``*.tmp-*`` leftovers of its own units, so
a killed pass resumes with every sample exactly once.  A folder built under another
config, or whose raw files changed, is refused in one line, or with ``--rebuild``
re-encoded where stale (``data/cache_check.py``).  Rank 0 writes ``manifest.json`` last.

Per sample the shard holds ``KEY.feat.safetensors`` (VAE posterior mean and std,
for text stages the T5 features trimmed to the caption's real length, and with
``objective.repa`` the REPA encoder's patch features: ``data/repa_features.py``) and
``KEY.json`` (caption, label, original size, crop, bucket, score, and the sample's
checksum: ``data/cache_format.py``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from tristage.data.buckets import RatioOutOfRange, place
from tristage.data.cache_check import complete_manifest, refusal, stale_units, stamp
from tristage.data.cache_format import (
    MANIFEST,
    NULL_CAPTION,
    SKIPPED,
    VALIDATION_PROMPTS,
    CacheError,
    done_marker,
    sample_json,
    shard_name,
)
from tristage.data.config import DataConfig, EncoderConfig, SourceConfig
from tristage.data.fingerprint import fingerprint
from tristage.data.repa_features import TENSOR, WIDTH, RepaEncoder, RepaFeatures
from tristage.data.sources import RawItem, Skips, Unit, class_names, open_source
from tristage.data.text_codec import encode_text_feature

MIN_SIDE = 32  # images smaller than this (either side) are skipped as too small
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

log = logging.getLogger(__name__)


@dataclass
class Encoders:
    """The frozen encoders of a cache pass (T5 parts are None without ``encoders.text_encoder``)."""

    vae: torch.nn.Module
    tokenizer: object | None
    text_encoder: torch.nn.Module | None
    device: torch.device
    repa: RepaEncoder | None = None  # the REPA encoder (objective.repa), else None

    @classmethod
    def load(
        cls, cfg: EncoderConfig, device: torch.device, repa: RepaFeatures | None = None, resolution: int = 256
    ) -> Encoders:
        """The frozen encoders (``repa``: also the REPA encoder, for images of ``resolution``)."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, T5EncoderModel

        vae = AutoencoderKL.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
        aligned = None if repa is None else RepaEncoder(repa, resolution, device)
        if cfg.text_encoder is None:  # class-conditional: no text features
            return cls(vae, None, None, device, aligned)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        t5 = T5EncoderModel.from_pretrained(cfg.text_encoder).to(device).eval().requires_grad_(False)
        return cls(vae, tokenizer, t5, device, aligned)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> posterior mean and std, each (B, C, H/8, W/8)."""
        dist = self.vae.encode(pixels.to(self.device)).latent_dist
        return dist.mean, dist.std

    def encode_aligned(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) in [-1, 1] -> the REPA encoder's (B, h, w, D) patch features; None without one."""
        return None if self.repa is None else self.repa.encode(pixels)

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_tokens: int) -> list[torch.Tensor]:
        """Captions -> T5 features trimmed to each caption's real token count, each (L_i, C)."""
        batch = self.tokenizer(
            captions, max_length=max_tokens, truncation=True, padding="longest", return_tensors="pt"
        )
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        feats = self.text_encoder(ids, attention_mask=mask).last_hidden_state  # (B, L, C)
        return [f[: int(m.sum())] for f, m in zip(feats, mask)]


def to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1


def open_rgb(item: RawItem, skips: Skips) -> Image.Image | None:
    """The item's image decoded to RGB; None (counted as ``undecodable_image``) when PIL cannot."""
    try:
        image = Image.open(io.BytesIO(item.image))
        image.load()
        return image.convert("RGB")
    except Exception:  # PIL raises many types for bad files; all mean "undecodable"
        skips.add("undecodable_image", item.key)
        return None


def decode(item: RawItem, data: DataConfig, skips: Skips) -> tuple[Image.Image, dict] | None:
    """Decode, check size and ratio, and fit into a bucket; None (counted) when unusable."""
    image = open_rgb(item, skips)
    if image is None:
        return None
    if min(image.size) < MIN_SIDE:
        skips.add("too_small", item.key)
        return None
    try:
        fitted, where = place(image, data.resolution, data.multi_aspect)
    except RatioOutOfRange:
        skips.add("aspect_ratio_out_of_range", item.key)
        return None
    meta = {
        "key": item.key,
        "caption": item.caption,
        "label": item.label,
        "score": item.score,
        "original_size": list(where.original),
        "crop": list(where.crop),
        "bucket": list(where.bucket),
    }
    return fitted, meta


class ShardWriter:
    """Writes one unit's feature shard atomically, batching encoder calls per bucket."""

    def __init__(self, enc: EncoderConfig, encoders: Encoders, path: Path):
        self.enc, self.encoders, self.path = enc, encoders, path
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        # A whole-second mtime keeps members plain ustar: a float one makes tarfile add a 1 KiB pax
        # header to every member (2 KiB per sample) that every reader then has to parse.
        self.writer = wds.TarWriter(str(self.tmp), mtime=int(time.time()))
        self.pending: dict[tuple, list] = defaultdict(list)
        self.written = 0
        self.dtype = DTYPES[enc.feature_dtype]

    def add(self, image: Image.Image, meta: dict) -> None:
        bucket = tuple(meta["bucket"])
        self.pending[bucket].append((image, meta))
        if len(self.pending[bucket]) >= self.enc.batch_size:
            self._flush(bucket)

    def _flush(self, bucket: tuple) -> None:
        items, self.pending[bucket] = self.pending[bucket], []
        if not items:
            return
        pixels = torch.stack([to_pixels(img) for img, _ in items])  # (B, 3, H, W)
        mean, std = self.encoders.encode_images(pixels)
        texts = self._texts([m["caption"] for _, m in items])
        aligned = self.encoders.encode_aligned(pixels)  # (B, h, w, D) or None
        for i, (_, meta) in enumerate(items):
            tensors = {"mean": mean[i].to(self.dtype), "std": std[i].to(self.dtype)}
            if aligned is not None:
                tensors[TENSOR] = aligned[i].to(self.encoders.repa.dtype)
            if texts is not None:
                tensors.update(encode_text_feature(texts[i], self.enc.text_feature_dtype))
                meta["tokens"] = int(texts[i].shape[0])
            feat = st_save(_cpu(tensors))
            sample = {"__key__": meta["key"], "feat.safetensors": feat, "json": sample_json(meta, feat)}
            self.writer.write(sample)
            self.written += 1

    def _texts(self, captions: list) -> list[torch.Tensor] | None:
        if self.encoders.text_encoder is None:
            return None
        return self.encoders.encode_text(captions, self.enc.max_tokens)

    def close(self, skips: Skips, images: int, rank: int, provenance: dict | None = None) -> None:
        """Flush, fsync, rename into place, then write the completeness marker.

        ``provenance``: the fingerprint and the raw files' stamps (``data.cache_check``)."""
        for bucket in list(self.pending):
            self._flush(bucket)
        self.writer.close()
        _fsync(self.tmp)
        os.replace(self.tmp, self.path)
        done = {"samples": self.written, "images": images, "rank": rank, "skips": skips.to_dict()}
        _atomic_write(done_marker(self.path), json.dumps({**done, **(provenance or {})}))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def shard_path(cache_dir: Path, unit: Unit) -> Path:
    return cache_dir / shard_name(unit.index)


def cache_unit(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Encoders,
    source,
    unit: Unit,
    cache_dir: Path,
    rank: int = 0,
    fp: dict | None = None,
) -> int:
    """Encode one unit into its shard; returns the number of images read."""
    skips = Skips()
    # Stamped before reading: a file that changes during the read shows up as changed next time.
    provenance = {"fingerprint": fp, "source": stamp(source.unit_files(unit))}
    writer = ShardWriter(enc, encoders, shard_path(cache_dir, unit))
    seen = 0
    for item in source.read(unit, skips):
        seen += 1
        decoded = decode(item, data, skips)
        if decoded is not None:
            writer.add(*decoded)
    writer.close(skips, seen, rank, provenance)
    return seen


def remove_stale_tmp(units: list[Unit], cache_dir: Path) -> int:
    """Delete the ``*.tmp-*`` files a killed pass left for these units (only their owner calls this)."""
    stale = [
        tmp
        for unit in units
        for final in (shard_path(cache_dir, unit), done_marker(shard_path(cache_dir, unit)))
        for tmp in cache_dir.glob(f"{final.name}.tmp-*")
    ]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def write_null_caption(enc: EncoderConfig, encoders: Encoders, cache_dir: Path) -> None:
    """T5("") -- the CFG null condition diffusers' PixArt pipeline uses -- for caption dropout."""
    if encoders.text_encoder is None:
        return
    (null,) = encoders.encode_text([""], enc.max_tokens)
    stored = encode_text_feature(null, enc.text_feature_dtype)
    save_file({k: v.cpu().contiguous() for k, v in stored.items()}, cache_dir / NULL_CAPTION)


@torch.no_grad()
def write_validation_prompts(
    prompts: Sequence[str], enc: EncoderConfig, encoders: Encoders, cache_dir: Path
) -> None:
    """T5 features of ``prompts`` (``validation.prompts``) and of "" (the CFG null), padded to one length.

    They are computed here, once, by the encoder already loaded on the accelerator, so no trainer rank
    ever runs T5 for validation (T5-XXL on a CPU takes minutes while the other ranks wait).  The file
    names its prompts; the encoder that made it is the one this cache's fingerprint names.
    """
    path = cache_dir / VALIDATION_PROMPTS
    if encoders.text_encoder is None or not prompts:
        path.unlink(missing_ok=True)
        return
    prompts = list(prompts)
    feats = encoders.encode_text([*prompts, ""], enc.max_tokens)  # each (L_i, C)
    embeds = torch.zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])  # (P + 1, L, C)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long)  # (P + 1, L)
    for i, feat in enumerate(feats):
        embeds[i, : len(feat)], mask[i, : len(feat)] = feat.float(), 1
    save_file(_cpu({"embeds": embeds, "mask": mask}), path, metadata={"prompts": json.dumps(prompts)})


def validation_prompts_current(prompts: Sequence[str], cache_dir: Path, fp: dict) -> bool:
    """Whether the stored validation features are these prompts (nothing to store: True)."""
    if fp["text_encoder"] == "none" or not prompts:
        return True
    path = cache_dir / VALIDATION_PROMPTS
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as stored:
        return json.loads(stored.metadata()["prompts"]) == list(prompts)


def write_manifest(
    source: SourceConfig,
    units: list[Unit],
    cache_dir: Path,
    fp: dict,
    scaling_factor: float,
    repa_width: int | None = None,
) -> dict:
    """Collect the done markers into ``manifest.json`` and ``skipped.json`` (rank 0, after all units)."""
    skips, shards = Skips(), []
    for unit in units:
        shard = shard_path(cache_dir, unit)
        done = json.loads(done_marker(shard).read_text())
        skips.merge(done["skips"])
        shards.append({"file": shard.name, "samples": done["samples"]})
    manifest = {
        "fingerprint": fp,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "scaling_factor": scaling_factor,
        "class_names": {str(k): v for k, v in class_names(source).items()},
        "null_caption": NULL_CAPTION if (cache_dir / NULL_CAPTION).exists() else None,
        "skipped": dict(skips.counts),
    }
    if repa_width is not None:  # the trainer sizes the REPA projector by it, without the encoder
        manifest[WIDTH] = repa_width
    _atomic_write(cache_dir / SKIPPED, json.dumps(skips.to_dict(), indent=1))
    _atomic_write(cache_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def own_units(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """Round-robin deal: unit ``i`` belongs to rank ``i % world``, so no two processes share a file."""
    return [u for u in units if u.index % world == rank]


def pending_units(units: list[Unit], cache_dir: Path, rank: int, world: int) -> list[Unit]:
    """This process's units that have no completeness marker yet."""
    return [u for u in own_units(units, rank, world) if not done_marker(shard_path(cache_dir, u)).exists()]


def check_existing(cache_dir: Path, units: list[Unit], source, fp: dict, rebuild: bool) -> list[Unit]:
    """The done units that must be re-encoded; without ``rebuild`` any is a one-line error.

    Features of another configuration, or of raw files that changed since, are never mixed in."""
    stale, reasons = stale_units(cache_dir, units, source, fp)
    if stale and not rebuild:
        raise CacheError(refusal(reasons))
    for reason in reasons[:10]:
        log.warning("cache --rebuild: re-encoding: %s", reason)
    if len(reasons) > 10:
        log.warning("cache --rebuild: ... and %d more shards", len(reasons) - 10)
    return stale


def forget(units: list[Unit], cache_dir: Path, drop_manifest: bool) -> None:
    """Delete these units' shards and done markers (their owner calls this), and the manifest."""
    for unit in units:
        done_marker(shard_path(cache_dir, unit)).unlink(missing_ok=True)
        shard_path(cache_dir, unit).unlink(missing_ok=True)
    if drop_manifest:  # a half-rebuilt folder must not pass for a complete cache
        (cache_dir / MANIFEST).unlink(missing_ok=True)


def existing_cache(
    cache_dir: Path, units: list[Unit], source, fp: dict, prompts: Sequence[str], rebuild: bool
) -> tuple[list[Unit], dict | None]:
    """(stale units to re-encode, the manifest if the folder already holds this whole cache, else None);
    the same answer on every rank."""
    stale = check_existing(cache_dir, units, source, fp, rebuild)
    current = not stale and validation_prompts_current(prompts, cache_dir, fp)
    return stale, complete_manifest(cache_dir, units) if current else None


def clear_for_encoding(cache_dir: Path, units: list[Unit], stale: list[Unit], accelerator) -> list[Unit]:
    """Remove this rank's stale shards and temp leftovers; returns the units without a done marker
    (every rank's same list, read after every rank's removals)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.wait_for_everyone()  # every rank has read the folder before any file is removed
    forget(
        own_units(stale, rank, world), cache_dir, drop_manifest=bool(stale) and accelerator.is_main_process
    )
    remove_stale_tmp(own_units(units, rank, world), cache_dir)
    accelerator.wait_for_everyone()
    fresh = [u for u in units if not done_marker(shard_path(cache_dir, u)).exists()]
    accelerator.wait_for_everyone()  # every rank has listed `fresh` before any unit is written
    return fresh


def run_cache(
    data: DataConfig,
    enc: EncoderConfig,
    accelerator,
    prompts: Sequence[str] = (),
    rebuild: bool = False,
    repa: RepaFeatures | None = None,
) -> dict | None:
    """The whole pass for one stage's data and encoders, under an ``accelerate`` process group.

    ``enc.text_encoder`` None caches no text (class-conditional); ``prompts`` (``validation.prompts``)
    get their T5 features stored once, for the validation grids; ``repa`` adds the REPA encoder's
    features.  A complete cache is recognised before any encoder loads (a requeued job costs a few
    stats, not a VAE/T5 load)."""
    cache_dir = Path(data.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(data.source)
    units = source.units()
    fp = fingerprint(data, enc, repa)
    stale, done = existing_cache(cache_dir, units, source, fp, prompts, rebuild)
    if done is not None:
        if accelerator.is_main_process:
            log.warning("cache: %s is complete (%d samples), nothing to encode", cache_dir, done["samples"])
        return done if accelerator.is_main_process else None
    fresh = clear_for_encoding(cache_dir, units, stale, accelerator)
    todo = own_units(fresh, accelerator.process_index, accelerator.num_processes)
    # Only rank 0 needs the encoders without units of its own (null caption, scaling factor).
    need = todo or accelerator.is_main_process
    encoders = Encoders.load(enc, accelerator.device, repa, data.resolution) if need else None
    start = time.perf_counter()
    encode_units(data, enc, encoders, source, todo, cache_dir, accelerator, fp)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    write_null_caption(enc, encoders, cache_dir)
    write_validation_prompts(prompts, enc, encoders, cache_dir)
    manifest = write_manifest(data.source, units, cache_dir, fp, *manifest_encoders(encoders))
    log_summary(manifest, fresh, cache_dir, time.perf_counter() - start)
    return manifest


def manifest_encoders(encoders: Encoders) -> tuple[float, int | None]:
    """What the manifest records of the encoders: the VAE's scaling factor, the REPA encoder's width."""
    return float(encoders.vae.config.scaling_factor), None if encoders.repa is None else encoders.repa.width


def encode_units(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Encoders | None,
    source,
    todo: list[Unit],
    cache_dir: Path,
    accelerator,
    fp: dict,
) -> None:
    """This process's units, with a rank-0 progress bar: shards done, ETA, and images/s."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="shard", disable=not accelerator.is_main_process, desc="cache")
    images, start = 0, time.perf_counter()
    for unit in todo:
        images += cache_unit(data, enc, encoders, source, unit, cache_dir, accelerator.process_index, fp)
        bar.set_postfix_str(f"{images / max(time.perf_counter() - start, 1e-9):.1f} img/s", refresh=False)
        bar.update(1)
    bar.close()


def log_summary(manifest: dict, fresh: list[Unit], cache_dir: Path, seconds: float) -> None:
    """Rank 0's end-of-pass line: samples, skips by reason, the skip report, overall images/s."""
    images = sum(json.loads(done_marker(shard_path(cache_dir, u)).read_text())["images"] for u in fresh)
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(manifest["skipped"].items())) or "nothing"
    log.warning(
        "cache: %d samples in %d shards; skipped %s (report: %s); %d images read in %.1fs, %.1f images/s",
        manifest["samples"],
        len(manifest["shards"]),
        skipped,
        cache_dir / "skipped.json",
        images,
        seconds,
        images / max(seconds, 1e-9),
    )
