"""The caching pass: frozen VAE + T5 over raw source units -> webdataset feature shards + manifest.

Each source unit is placed in a shard ``features-{i:05d}.tar``: the shard that already holds its key
(its name within the source), else a new one (``data/cache_check.py``).  Units are dealt to
processes round-robin (``i % world == rank``), so no two processes ever write the same file.  A
shard is written under a temporary name, fsynced, renamed (on an object store: written locally,
then uploaded in one piece), and only then marked complete by ``features-{i:05d}.done.json``
(counts, skips, the writer's rank, the fingerprint, the unit's key and content identity).  A rerun
skips units that carry a done marker and first deletes the ``*.tmp-*`` leftovers of its own units,
so a killed pass resumes with every sample exactly once.  A unit whose raw input changed is
re-encoded; a folder built under another config is refused in one line, or with ``--rebuild``
re-encoded.  A folder of the previous format is upgraded in place (``data/cache_migrate.py``).
Rank 0 writes ``manifest.json`` last.  ``data.cache_dir`` may be an ``s3://`` or ``gs://`` URL.

Per sample the shard holds ``KEY.feat.safetensors`` (VAE posterior mean and std,
and, for text stages, the T5 features trimmed to the caption's real length) and
``KEY.json`` (caption, label, original size, crop, bucket, score, and the sample's
checksum: ``data/cache_format.py``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save as st_save

from tristage.data import storage
from tristage.data.buckets import RatioOutOfRange, place
from tristage.data.cache_check import (
    Stale,
    complete_manifest,
    identities,
    read_markers,
    refusal,
    stale_units,
)
from tristage.data.cache_check import place as place_units
from tristage.data.cache_format import (
    MANIFEST,
    NULL_CAPTION,
    SKIPPED,
    VALIDATION_PROMPTS,
    CacheError,
    done_marker_name,
    sample_json,
    shard_name,
)
from tristage.data.cache_migrate import upgrade_legacy
from tristage.data.config import DataConfig, EncoderConfig, SourceConfig
from tristage.data.fingerprint import fingerprint
from tristage.data.sources import RawItem, Skips, Unit, class_names, open_source
from tristage.data.text_codec import encode_text_feature
from tristage.files import remove_tmp, tmp_path

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

    @classmethod
    def load(cls, cfg: EncoderConfig, device: torch.device) -> Encoders:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, T5EncoderModel

        vae = AutoencoderKL.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
        if cfg.text_encoder is None:  # class-conditional: no text features
            return cls(vae, None, None, device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        t5 = T5EncoderModel.from_pretrained(cfg.text_encoder).to(device).eval().requires_grad_(False)
        return cls(vae, tokenizer, t5, device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> posterior mean and std, each (B, C, H/8, W/8)."""
        dist = self.vae.encode(pixels.to(self.device)).latent_dist
        return dist.mean, dist.std

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
    """Writes one unit's feature shard atomically, batching encoder calls per bucket.

    ``path`` is where the shard goes (a local path or URL); it is written under ``staging`` (the local
    folder: beside it, or for a URL a local staging folder) and moved there whole by :meth:`close`."""

    def __init__(self, enc: EncoderConfig, encoders: Encoders, path: str | Path, staging: Path | None = None):
        self.enc, self.encoders, self.path = enc, encoders, str(path)
        staging = Path(storage.parent(self.path)) if staging is None else staging
        self.tmp = tmp_path(staging / storage.basename(self.path))
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
        for i, (_, meta) in enumerate(items):
            tensors = {"mean": mean[i].to(self.dtype), "std": std[i].to(self.dtype)}
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
        storage.upload(self.tmp, self.path)  # fsync + rename, or one upload
        done = {"samples": self.written, "images": images, "rank": rank, "skips": skips.to_dict()}
        storage.write_text(done_marker_name(self.path), json.dumps({**done, **(provenance or {})}))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def shard_path(cache_dir: str | Path, unit: Unit) -> str:
    return storage.join(str(cache_dir), shard_name(unit.cache_index))


def staging_dir(cache_dir: str) -> Path:
    """Where shards are written before they move into ``cache_dir``: the folder itself when local; for
    a URL a local folder named after it (so a rerun finds, and deletes, a killed pass's leftovers)."""
    if storage.is_local(cache_dir):
        return Path(cache_dir)
    import tempfile

    import xxhash

    folder = Path(tempfile.gettempdir()) / "tristage-staging" / xxhash.xxh3_64_hexdigest(cache_dir.encode())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_unit(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Encoders,
    source,
    unit: Unit,
    cache_dir: str | Path,
    rank: int = 0,
    provenance: dict | None = None,
) -> int:
    """Encode one unit into its shard; returns the number of images read.

    ``provenance``: the fingerprint and the unit's key and content identity, taken before the read,
    so a file that changes during it shows up as changed next time."""
    skips = Skips()
    writer = ShardWriter(enc, encoders, shard_path(cache_dir, unit), staging_dir(str(cache_dir)))
    seen = 0
    for item in source.read(unit, skips):
        seen += 1
        decoded = decode(item, data, skips)
        if decoded is not None:
            writer.add(*decoded)
    writer.close(skips, seen, rank, provenance)
    return seen


def remove_stale_tmp(units: list[Unit], cache_dir: str) -> int:
    """Delete the ``*.tmp-*`` files a killed pass left for these units (only their owner calls this).
    On an object store nothing half-written is visible: only the local staging copies are."""
    staging = staging_dir(cache_dir)
    names = [shard_name(unit.cache_index) for unit in units]
    return remove_tmp(staging / name for name in [*names, *map(done_marker_name, names)])


def write_null_caption(enc: EncoderConfig, encoders: Encoders, cache_dir: str | Path) -> None:
    """T5("") -- the CFG null condition diffusers' PixArt pipeline uses -- for caption dropout."""
    if encoders.text_encoder is None:
        return
    (null,) = encoders.encode_text([""], enc.max_tokens)
    stored = encode_text_feature(null, enc.text_feature_dtype)
    storage.write_bytes(storage.join(str(cache_dir), NULL_CAPTION), st_save(_cpu(stored)))


@torch.no_grad()
def write_validation_prompts(
    prompts: Sequence[str], enc: EncoderConfig, encoders: Encoders, cache_dir: str
) -> None:
    """T5 features of ``prompts`` (``validation.prompts``) and of "" (the CFG null), padded to one length.

    They are computed here, once, by the encoder already loaded on the accelerator, so no trainer rank
    ever runs T5 for validation (T5-XXL on a CPU takes minutes while the other ranks wait).  The file
    names its prompts; the encoder that made it is the one this cache's fingerprint names.
    """
    path = storage.join(cache_dir, VALIDATION_PROMPTS)
    if encoders.text_encoder is None or not prompts:
        storage.remove(path)
        return
    prompts = list(prompts)
    feats = encoders.encode_text([*prompts, ""], enc.max_tokens)  # each (L_i, C)
    embeds = torch.zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])  # (P + 1, L, C)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long)  # (P + 1, L)
    for i, feat in enumerate(feats):
        embeds[i, : len(feat)], mask[i, : len(feat)] = feat.float(), 1
    tensors = _cpu({"embeds": embeds, "mask": mask})
    storage.write_bytes(path, st_save(tensors, metadata={"prompts": json.dumps(prompts)}))


def validation_prompts_current(prompts: Sequence[str], cache_dir: str, fp: dict) -> bool:
    """Whether the stored validation features are these prompts (nothing to store: True)."""
    if fp["text_encoder"] == "none" or not prompts:
        return True
    path = storage.join(cache_dir, VALIDATION_PROMPTS)
    if not storage.exists(path):
        return False
    size = int.from_bytes(storage.read_bytes(path, 0, 8), "little")  # the safetensors header only
    header = json.loads(storage.read_bytes(path, 8, 8 + size))
    return json.loads(header["__metadata__"]["prompts"]) == list(prompts)


def write_manifest(
    source: SourceConfig, units: list[Unit], cache_dir: str | Path, fp: dict, scaling_factor: float
) -> dict:
    """Collect the units' done markers into ``manifest.json`` and ``skipped.json`` (rank 0, after all
    units): per shard its file, samples, unit key and content identity."""
    cache_dir = str(cache_dir)
    files = [shard_name(u.cache_index) for u in units]
    markers = storage.read_many([storage.join(cache_dir, done_marker_name(f)) for f in files])
    skips, shards = Skips(), []
    for name in files:
        done = json.loads(markers[storage.join(cache_dir, done_marker_name(name))])
        skips.merge(done["skips"])
        shards.append(
            {"file": name, "samples": done["samples"], "unit": done.get("unit"), "input": done.get("input")}
        )
    manifest = {
        "fingerprint": fp,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "scaling_factor": scaling_factor,
        "class_names": {str(k): v for k, v in class_names(source).items()},
        "null_caption": NULL_CAPTION if storage.exists(storage.join(cache_dir, NULL_CAPTION)) else None,
        "skipped": dict(skips.counts),
    }
    storage.write_text(storage.join(cache_dir, SKIPPED), json.dumps(skips.to_dict(), indent=1))
    storage.write_text(storage.join(cache_dir, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def own_units(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """Round-robin deal: shard ``i`` belongs to rank ``i % world``, so no two processes share a file."""
    return [u for u in units if u.cache_index % world == rank]


def check_existing(stale: Stale, rebuild: bool) -> list[Unit]:
    """The done units that must be re-encoded: those whose raw input changed, always; those of
    another configuration only with ``rebuild`` (else a one-line error).  Features of another
    configuration, or of raw files that changed since, are never mixed in."""
    if stale.other_config and not rebuild:
        raise CacheError(refusal([r for _, r in stale.other_config]))
    reasons = [r for _, r in stale.other_config + stale.changed]
    for reason in reasons[:10]:
        log.warning("cache: re-encoding %s", reason)
    if len(reasons) > 10:
        log.warning("cache: ... and %d more shards", len(reasons) - 10)
    return stale.units


def forget(units: list[Unit], cache_dir: str, drop_manifest: bool) -> None:
    """Delete these units' done markers, then their shards (their owner calls this), and the manifest."""
    for unit in units:
        storage.remove(done_marker_name(shard_path(cache_dir, unit)))
        storage.remove(shard_path(cache_dir, unit))
    if drop_manifest:  # a half-rebuilt folder must not pass for a complete cache
        storage.remove(storage.join(cache_dir, MANIFEST))


@dataclass
class Plan:
    """What a cache pass finds in its folder before it writes anything (the same on every rank)."""

    units: list[Unit]  # every unit of the source, placed in its shard
    idents: dict[str, dict]  # unit key -> content identity
    stale: list[Unit]  # done units to re-encode
    done: dict | None  # the manifest, when the folder already holds this whole cache


def survey(cache_dir: str, source, fp: dict, prompts: Sequence[str], rebuild: bool) -> Plan:
    """Place the source's units in shards and decide what is stale, before any encoder loads (a
    requeued job on a complete cache costs a listing and a few reads, not a VAE/T5 load)."""
    units = source.units()
    markers = upgrade_legacy(cache_dir, units, source, fp, read_markers(cache_dir), rebuild)
    placed = place_units(units, markers)
    idents = identities(source, placed)
    stale = check_existing(stale_units(cache_dir, placed, markers, idents, fp), rebuild)
    removed = len({m.get("unit") for m in markers.values()} - {u.key for u in placed} - {None})
    if removed:
        what = "unit is" if removed == 1 else "units are"
        log.warning(
            "cache: %d cached %s no longer in the source; kept, left out of the manifest", removed, what
        )
    current = not stale and validation_prompts_current(prompts, cache_dir, fp)
    return Plan(placed, idents, stale, complete_manifest(cache_dir, placed, markers) if current else None)


def run_cache(
    data: DataConfig, enc: EncoderConfig, accelerator, prompts: Sequence[str] = (), rebuild: bool = False
) -> dict | None:
    """The whole pass for one stage's data and encoders, under an ``accelerate`` process group.

    ``enc.text_encoder`` None caches no text (class-conditional); ``prompts`` (``validation.prompts``)
    get their T5 features stored once, for the validation grids."""
    cache_dir = str(data.cache_dir)
    storage.makedirs(cache_dir)
    source = open_source(data.source)
    fp = fingerprint(data, enc)
    plan = survey(cache_dir, source, fp, prompts, rebuild)
    if plan.done is not None:
        if accelerator.is_main_process:
            log.info("cache: %s is complete (%d samples), nothing to encode", cache_dir, plan.done["samples"])
        return plan.done if accelerator.is_main_process else None
    fresh = clear_for_encoding(plan, cache_dir, accelerator)
    todo = own_units(fresh, accelerator.process_index, accelerator.num_processes)
    # Only rank 0 needs the encoders without units of its own (null caption, scaling factor).
    encoders = Encoders.load(enc, accelerator.device) if todo or accelerator.is_main_process else None
    start = time.perf_counter()
    encode_units(data, enc, encoders, source, todo, cache_dir, accelerator, (fp, plan.idents))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    write_null_caption(enc, encoders, cache_dir)
    write_validation_prompts(prompts, enc, encoders, cache_dir)
    manifest = write_manifest(
        data.source, plan.units, cache_dir, fp, float(encoders.vae.config.scaling_factor)
    )
    log_summary(manifest, fresh, cache_dir, time.perf_counter() - start)
    return manifest


def clear_for_encoding(plan: Plan, cache_dir: str, accelerator) -> list[Unit]:
    """Delete this rank's stale shards and temporary leftovers; the units left to encode (all ranks)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.wait_for_everyone()  # every rank has read the folder before any file is removed
    drop_manifest = bool(plan.stale) and accelerator.is_main_process
    forget(own_units(plan.stale, rank, world), cache_dir, drop_manifest)
    remove_stale_tmp(own_units(plan.units, rank, world), cache_dir)
    accelerator.wait_for_everyone()
    held = set(storage.names(cache_dir, "features-*.done.json"))
    fresh = [u for u in plan.units if done_marker_name(shard_name(u.cache_index)) not in held]
    accelerator.wait_for_everyone()  # every rank has listed `fresh` before any unit is written
    return fresh


def encode_units(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Encoders | None,
    source,
    todo: list[Unit],
    cache_dir: str,
    accelerator,
    recorded: tuple[dict, dict],
) -> None:
    """This process's units, with a rank-0 progress bar: shards done, ETA, and images/s.
    ``recorded``: (fingerprint, unit key -> content identity), written into each done marker."""
    from tqdm.auto import tqdm

    fp, idents = recorded
    bar = tqdm(total=len(todo), unit="shard", disable=not accelerator.is_main_process, desc="cache")
    images, start = 0, time.perf_counter()
    for unit in todo:
        provenance = {"fingerprint": fp, "unit": unit.key, "input": idents[unit.key]}
        images += cache_unit(
            data, enc, encoders, source, unit, cache_dir, accelerator.process_index, provenance
        )
        bar.set_postfix_str(f"{images / max(time.perf_counter() - start, 1e-9):.1f} img/s", refresh=False)
        bar.update(1)
    bar.close()


def log_summary(manifest: dict, fresh: list[Unit], cache_dir: str, seconds: float) -> None:
    """Rank 0's end-of-pass line: samples, skips by reason, the skip report, overall images/s."""
    markers = storage.read_many([done_marker_name(shard_path(cache_dir, u)) for u in fresh])
    images = sum(json.loads(m)["images"] for m in markers.values())
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(manifest["skipped"].items())) or "nothing"
    log.info(
        "cache: %d samples in %d shards; skipped %s (report: %s); %d images read in %.1fs, %.1f images/s",
        manifest["samples"],
        len(manifest["shards"]),
        skipped,
        storage.join(cache_dir, SKIPPED),
        images,
        seconds,
        images / max(seconds, 1e-9),
    )
