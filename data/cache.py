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
for text stages the T5 features trimmed to the caption's real length, and with
``objective.repa`` the REPA encoder's patch features: ``data/repa_features.py``) and
``KEY.json`` (caption, label, original size, crop, bucket, score, and the sample's
checksum: ``data/cache_format.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
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
from tristage.data.decode import open_rgb
from tristage.data.fingerprint import fingerprint
from tristage.data.repa_features import TENSOR, WIDTH, RepaEncoder, RepaFeatures
from tristage.data.sources import RawItem, Skips, Unit, class_names, open_source, skipped_text
from tristage.data.text_codec import encode_text_feature
from tristage.data.unit_work import UnitPass, work_through
from tristage.data.val_split import held_out, val_dir
from tristage.disks import check_writable, is_refused, storage_error
from tristage.files import remove_tmp, tmp_path
from tristage.stopping import StopRequests

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


def decode(item: RawItem, data: DataConfig, skips: Skips) -> tuple[Image.Image, dict] | None:
    """Decode, check size and ratio, and fit into a bucket; None (counted) when unusable."""
    image = open_rgb(item, skips, tuple(data.source.alpha_background))
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

    def abort(self) -> None:
        """Drop the temporary shard's open file without writing more: after a failed write (a full disk)
        tarfile's own close, run again at garbage collection, would fail once more and print a traceback.
        The temporary file itself is removed by the unit's owner (``remove_stale_tmp``)."""
        self.writer.tarstream.closed = True  # no end-of-archive blocks
        stream, self.writer.own_fileobj = self.writer.own_fileobj, None
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except OSError:
                pass  # the buffered bytes the disk refused: the shard is abandoned anyway

    def close(self, skips: Skips, images: int, rank: int, provenance: dict | None = None) -> None:
        """Flush, fsync, rename into place, then write the completeness marker.

        ``provenance``: the fingerprint and the raw files' stamps (``data.cache_check``)."""
        for bucket in list(self.pending):
            self._flush(bucket)
        self.writer.close()
        storage.upload(self.tmp, self.path)  # fsync + rename, or one upload
        done = {
            "samples": self.written,
            "images": images,
            "rank": rank,
            "pid": os.getpid(),
            "skips": skips.to_dict(),
        }
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
    folder = storage.local_folder_for(cache_dir, "staging")
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
    # data.val_fraction: the held-out samples go to their own shard in val/ (data/val_split.py)
    val = str(val_dir(cache_dir))
    held = ShardWriter(enc, encoders, shard_path(val, unit), staging_dir(val)) if data.val_fraction else None
    seen = 0
    try:
        for item in source.read(unit, skips):
            seen += 1
            decoded = decode(item, data, skips)
            if decoded is not None:
                (held if held and held_out(item.key, data.val_fraction) else writer).add(*decoded)
        if held is not None:  # closed first: a unit marked done has both shards
            held.close(Skips(), held.written, rank, provenance)
        writer.close(skips, seen, rank, provenance)
    except BaseException:
        for open_writer in (writer, held):
            if open_writer is not None:
                open_writer.abort()
        raise
    return seen


def remove_stale_tmp(units: list[Unit], *folders: str) -> int:
    """Delete the ``*.tmp-*`` files a killed pass left for these units in each cache folder (only their
    owner calls this).  On an object store nothing half-written is visible: only the local staging
    copies are."""
    names = [shard_name(unit.cache_index) for unit in units]
    files = [*names, *map(done_marker_name, names)]
    return sum(remove_tmp(staging_dir(folder) / name for name in files) for folder in folders)


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
    source: SourceConfig,
    units: list[Unit],
    cache_dir: str | Path,
    fp: dict,
    scaling_factor: float,
    repa_width: int | None = None,
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
        "noted": dict(skips.noted),  # kept, with a note: animated_first_frame
    }
    if repa_width is not None:  # the trainer sizes the REPA projector by it, without the encoder
        manifest[WIDTH] = repa_width
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
    data: DataConfig,
    enc: EncoderConfig,
    accelerator,
    prompts: Sequence[str] = (),
    rebuild: bool = False,
    lock_timeout: float = 120.0,
    repa: RepaFeatures | None = None,
) -> dict | None:
    """The whole pass for one stage's data and encoders, under an ``accelerate`` process group.

    ``enc.text_encoder`` None caches no text (class-conditional); ``prompts`` (``validation.prompts``)
    get their T5 features stored once, for the validation grids; ``repa`` adds the REPA encoder's
    features.  A complete cache is recognised
    before any encoder loads (a requeued job costs a few stats, not a VAE/T5 load).  Units are shared
    with any other pass into the same folder through per-unit locks (``data/unit_work.py``;
    ``lock_timeout``: ``run.lock_timeout``)."""
    cache_dir = str(data.cache_dir)
    if not storage.exists(cache_dir):
        check_writable(cache_dir, "data.cache_dir")  # creates it, or one line naming the key
    storage.makedirs(cache_dir)
    source = open_source(data.source)
    fp = fingerprint(data, enc, repa)
    plan = survey(cache_dir, source, fp, prompts, rebuild)
    if plan.done is not None:
        if accelerator.is_main_process:
            log.info("cache: %s is complete (%d samples), nothing to encode", cache_dir, plan.done["samples"])
        return plan.done if accelerator.is_main_process else None
    check_writable(cache_dir, "data.cache_dir")  # before any encoder loads; a complete cache may be read-only
    if data.val_fraction:
        storage.makedirs(str(val_dir(cache_dir)))
    accelerator.wait_for_everyone()  # every rank has read the folder before any file is removed
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    forget(own_units(plan.stale, rank, world), cache_dir, drop_manifest=bool(plan.stale) and main)
    accelerator.wait_for_everyone()
    return encode_pass(data, (enc, repa), accelerator, (source, plan), fp, prompts, lock_timeout)


def encode_pass(
    data: DataConfig,
    encoding: tuple[EncoderConfig, RepaFeatures | None],
    accelerator,
    read: tuple,
    fp: dict,
    prompts: Sequence[str],
    lock_timeout: float,
) -> dict | None:
    """Every unit not done, shared with any other pass; then rank 0 writes the manifest (returned).
    ``encoding``: the encoders and the REPA features to cache; ``read``: the opened source and the
    survey's :class:`Plan`."""
    (source, plan), (enc, repa), main = read, encoding, accelerator.is_main_process
    # Loaded when first needed: a process whose units another pass encodes never loads them (rank 0
    # always does, for the null caption and the scaling factor).
    encoders = functools.cache(lambda: Encoders.load(enc, accelerator.device, repa, data.resolution))
    recorded = (fp, plan.idents)
    work = cache_pass(data, enc, encoders, source, accelerator.process_index, recorded, lock_timeout)
    start = time.perf_counter()
    with StopRequests(*SHARD_IN_FLIGHT, announce=main) as stop, progress(work, plan.units, main):
        images = work_through(plan.units, work, accelerator, stop)
    images = int(accelerator.reduce(torch.tensor(images, device=accelerator.device), reduction="sum"))
    if not main:
        return None
    manifest = finish_cache(data, enc, encoders(), plan.units, prompts, fp)
    log_summary(manifest, images, str(data.cache_dir), time.perf_counter() - start)
    return manifest


@contextlib.contextmanager
def progress(work: UnitPass, units: list[Unit], show: bool) -> Iterator[None]:
    """A progress bar (rank 0) over the units not done yet: shards, ETA and images/s of this process."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(not work.done(u) for u in units), unit="shard", disable=not show, desc="cache")
    run, images, start = work.run, [0], time.perf_counter()

    def counted(unit: Unit) -> int:
        read = run(unit)
        images[0] += read
        bar.set_postfix_str(f"{images[0] / max(time.perf_counter() - start, 1e-9):.1f} img/s", refresh=False)
        bar.update(1)
        return read

    work.run = counted
    try:
        yield
    finally:
        work.run = run
        bar.close()


SHARD_IN_FLIGHT = ("finishing the shard in flight", "(it is redone next time)")  # the second Ctrl-C's line


def cache_pass(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Callable[[], Encoders],
    source,
    rank: int,
    recorded: tuple[dict, dict],
    lock_timeout: float,
) -> UnitPass:
    """How the cache pass writes one unit: ``features-NNNNN.tar`` and its done marker, under its lock.

    ``recorded``: (fingerprint, unit key -> content identity), written into each done marker.  Lock
    files sit beside the shards, or for a cache on an object store in the local staging folder (units
    are then shared by the passes of one host)."""
    cache_dir, (fp, idents) = str(data.cache_dir), recorded
    locks, local = staging_dir(cache_dir), storage.is_local(cache_dir)
    folders = (cache_dir, str(val_dir(cache_dir))) if data.val_fraction else (cache_dir,)

    def provenance(u: Unit) -> dict:
        return {"fingerprint": fp, "unit": u.key, "input": idents[u.key]}

    def marker(u: Unit) -> str:
        return done_marker_name(shard_path(cache_dir, u))

    return UnitPass(
        name="cache",
        folder=Path(cache_dir) if local else locks,
        lock_path=lambda u: locks / f"{shard_name(u.cache_index)}.lock",
        done=lambda u: storage.exists(marker(u)),
        run=lambda u: cache_unit(data, enc, encoders(), source, u, cache_dir, rank, provenance(u)),
        outputs=lambda u: [Path(shard_path(cache_dir, u)), Path(marker(u))] if local else [],
        remove_tmp=lambda u: remove_stale_tmp([u], *folders),
        lock_timeout=lock_timeout,
    )


def finish_cache(
    data: DataConfig,
    enc: EncoderConfig,
    encoders: Encoders,
    units: list[Unit],
    prompts: Sequence[str],
    fp: dict,
) -> dict:
    """Rank 0, every unit done: the null caption, the validation prompts and the manifest (atomic
    writes: a second pass into the folder may write the same files at the same time)."""
    cache_dir = str(data.cache_dir)
    try:
        write_null_caption(enc, encoders, cache_dir)
        write_validation_prompts(prompts, enc, encoders, cache_dir)
        recorded = manifest_encoders(encoders)
        if data.val_fraction:  # before the stage's manifest, which marks the whole cache complete
            write_manifest(data.source, units, str(val_dir(cache_dir)), fp, *recorded)
        return write_manifest(data.source, units, cache_dir, fp, *recorded)
    except OSError as err:
        if not is_refused(err):
            raise
        if storage.is_local(cache_dir):
            for tmp in Path(cache_dir).glob(f"*.tmp-{os.getpid()}"):  # what the atomic writes left
                tmp.unlink(missing_ok=True)
        raise storage_error(cache_dir, err) from None


def manifest_encoders(encoders: Encoders) -> tuple[float, int | None]:
    """What the manifest records of the encoders: the VAE's scaling factor, the REPA encoder's width."""
    return float(encoders.vae.config.scaling_factor), None if encoders.repa is None else encoders.repa.width


def log_summary(manifest: dict, images: int, cache_dir: str, seconds: float) -> None:
    """Rank 0's end-of-pass line: samples, skips by reason, the skip report, images read by this pass/s."""
    skipped = skipped_text(manifest)
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
