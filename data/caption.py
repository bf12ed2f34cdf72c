"""The captioning pass: a vision-language model over raw source units -> caption JSONL + manifest.

PixArt-alpha §2.2 re-captions SAM with LLaVA ("Describe this image and its style in a
very detailed manner") because alt-texts name too few objects.  This pass does that
for any source a stage config declares, with the readers and the unit split of the
cache pass (``data/sources.py``, ``data/cache.py``): unit ``i`` belongs to rank
``i % world`` and becomes ``OUTPUT.parts/captions-{i:05d}.jsonl``, written under a
temporary name, fsynced, renamed, then marked complete by ``captions-{i:05d}.done.json``.
A rerun skips marked units, so a killed or requeued job continues, and no two processes
write the same file.  Rank 0 then concatenates the parts in unit order (each part in
reader order) into ``OUTPUT`` and writes the manifest beside it (``captions.manifest.json``:
model, prompt, generation settings, counts, skips), so the final file does not depend
on how many processes wrote it.

The model is any ``AutoModelForImageTextToText`` whose processor has a chat template
(LLaVA-1.5, LLaVA-NeXT, ...), loaded with ``from_pretrained`` from a hub id or a folder.
Images are read a few batches ahead and sorted by size, so a batch holds similar image
token counts (LLaVA-NeXT's grid depends on the image size) and prompts; generation is
batched with left padding.  This module takes the caption and source sub-configs only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tristage.data import storage
from tristage.data.config import CaptionConfig, SourceConfig
from tristage.data.decode import WHITE, open_rgb
from tristage.data.sources import Skips, Unit, open_source, skipped_text
from tristage.data.unit_work import UnitPass, work_through
from tristage.disks import check_writable, is_refused, storage_error
from tristage.errors import CaptionError
from tristage.files import remove_tmp, tmp_path
from tristage.stopping import StopRequests

SETTINGS = "settings.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

log = logging.getLogger(__name__)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (as LLaVA is served), float32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class Captioner:
    """A loaded VLM and its processor, turning image batches into caption batches."""

    model: torch.nn.Module
    processor: object
    cfg: CaptionConfig  # the caption section: model, prompt, sampling
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, cfg: CaptionConfig, device: torch.device) -> Captioner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = resolve_dtype(cfg.dtype, device)
        try:
            processor = AutoProcessor.from_pretrained(cfg.model)
            model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        except ImportError as err:  # e.g. Qwen2-VL's video processor without torchvision
            raise CaptionError(missing_package(cfg.model, err)) from None
        except (OSError, ValueError) as err:  # not on disk and not reachable, or not a processor folder
            reason = str(err).splitlines()[0]
            raise CaptionError(f"caption.model: cannot load {cfg.model}: {reason}") from None
        if not processor.chat_template:
            raise CaptionError(f"caption.model: {cfg.model} has no chat template in its processor")
        # Decoder-only batches: left padding makes every prompt end at the last column.
        processor.tokenizer.padding_side = "left"
        return cls(model.to(device).eval().requires_grad_(False), processor, cfg, device, dtype)

    def prompt(self, hint: str | None) -> str:
        """The chat-formatted prompt for one image (with its existing caption when hints are on)."""
        text = self.cfg.prompt
        if self.cfg.hint and hint:
            text = self.cfg.hint_prompt.format(prompt=self.cfg.prompt, hint=hint)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: list, hints: list[str | None]):
        """Processor outputs for one batch: left-padded token ids, pixel values (model dtype)."""
        texts = [self.prompt(h) for h in hints]
        batch = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        return batch.to(self.device, dtype=self.dtype)  # casts only the floating tensors

    def generation_kwargs(self) -> dict:
        """``generate`` settings; temperature and top_p only when sampling (greedy ignores them)."""
        cfg = self.cfg
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {}
        return {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, **sampling}

    @torch.no_grad()
    def generate(self, batch) -> list[str]:
        """One batched ``generate`` -> the new text of every row, stripped."""
        out = self.model.generate(**batch, **self.generation_kwargs())  # (B, L_in + new)
        new = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


# transformers names a missing package in prose ("... requires the Torchvision library ..."): its pip name
PIP_NAMES = {"pil": "pillow", "vision": "pillow", "protobuf": "protobuf"}


def missing_package(model: str, err: ImportError) -> str:
    """One line naming ``caption.model`` and what to install for it."""
    found = err.name or next(iter(re.findall(r"requires the (\S+) library", str(err))), None)
    if found is None:
        return f"caption.model: {model} cannot be loaded: {str(err).strip().splitlines()[0]}"
    package = PIP_NAMES.get(found.lower(), found.lower())
    return (
        f"caption.model: {model} needs the package {package!r}, which is not installed: "
        f"pip install 'tristage[caption]' (or pip install {package})"
    )


def part_path(parts: str, unit: Unit) -> str:
    return storage.join(parts, f"captions-{unit.index:05d}.jsonl")


def part_done(part: str) -> str:
    return part.removesuffix(".jsonl") + ".done.json"


def parts_dir(output: str | Path) -> str:
    return f"{output}.parts"


def manifest_path(output: str | Path) -> str:
    """``captions.jsonl`` -> ``captions.manifest.json`` (beside it, also on an object store)."""
    folder, name = storage.parent(str(output)), storage.basename(str(output))
    return storage.join(folder, f"{name.rsplit('.', 1)[0] if '.' in name else name}.manifest.json")


def decoded(
    items: Iterable, skips: Skips, background: tuple[int, int, int] = WHITE
) -> Iterator[tuple[int, str, object, str | None]]:
    """(reader position, key, RGB image, existing caption) of every decodable item."""
    for n, item in enumerate(items):
        image = open_rgb(item, skips, background)
        if image is not None:
            yield n, item.key, image, item.caption


def size_batches(rows: Iterable[tuple], batch_size: int, window: int) -> Iterator[list[tuple]]:
    """Batches of ``batch_size`` rows, each cut from ``window`` batches read ahead and sorted by
    (aspect ratio, area, hint length): similar images and prompts share a batch, so it pads little."""
    pending: list[tuple] = []

    def key(row: tuple) -> tuple:
        width, height = row[2].size
        return (round(width / height, 2), width * height, len(row[3] or ""), row[0])

    for row in rows:
        pending.append(row)
        if len(pending) == batch_size * window:
            yield from _chunks(sorted(pending, key=key), batch_size)
            pending = []
    yield from _chunks(sorted(pending, key=key), batch_size)


def _chunks(rows: list, size: int) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def prefetched(batches: Iterator, depth: int = 2) -> Iterator:
    """Run a batch producer in a thread, ``depth`` batches ahead, so reading, decoding and the
    processor overlap generation; an exception in the producer is raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce() -> None:
        try:
            for batch in batches:
                slots.put(batch)
            slots.put(end)
        except BaseException as err:  # handed to the consumer, which re-raises it
            slots.put(err)

    threading.Thread(target=produce, daemon=True).start()
    while (batch := slots.get()) is not end:
        if isinstance(batch, BaseException):
            raise batch
        yield batch


def unit_batches(
    captioner: Captioner, source, unit: Unit, skips: Skips, counter: list[int], background: tuple = WHITE
) -> Iterator:
    """(rows, processor inputs) per batch of one unit; ``counter[0]`` counts the raw items read."""

    def items() -> Iterator:
        for item in source.read(unit, skips):
            counter[0] += 1
            yield item

    cfg = captioner.cfg
    for rows in size_batches(decoded(items(), skips, background), cfg.batch_size, cfg.sort_window):
        yield rows, captioner.inputs([r[2] for r in rows], [r[3] for r in rows])


def caption_unit(
    captioner: Captioner, source, unit: Unit, parts: str, rank: int, bar, background: tuple = WHITE
) -> int:
    """Caption one unit into its part file (atomic, then its done marker); returns images read."""
    skips, counter, lines = Skips(), [0], []
    if captioner.cfg.do_sample:
        torch.manual_seed(captioner.cfg.seed + unit.index)  # a rerun of this unit samples the same text
    for rows, batch in prefetched(unit_batches(captioner, source, unit, skips, counter, background)):
        for (n, key, _, _), text in zip(rows, captioner.generate(batch)):
            if text:
                lines.append((n, json.dumps({"id": key, "caption": text}, ensure_ascii=False)))
            else:
                skips.add("empty_caption", key)
        bar.update(len(rows))
    part = part_path(parts, unit)
    storage.write_text(part, "".join(line + "\n" for _, line in sorted(lines)))  # reader order
    done = {
        "captions": len(lines),
        "images": counter[0],
        "rank": rank,
        "pid": os.getpid(),
        "skips": skips.to_dict(),
    }
    storage.write_text(part_done(part), json.dumps(done))
    return counter[0]


def lock_folder(parts: str) -> Path:
    """Where the units' lock files go: beside the parts, or for parts on an object store in a local
    folder named after them (units are then shared by the passes of one host)."""
    if storage.is_local(parts):
        return Path(parts)
    folder = storage.local_folder_for(parts, "locks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_stale_tmp(units: list[Unit], parts: str) -> None:
    """Delete the ``*.tmp-*`` files a killed pass left for these units (only their owner calls this).
    An object store has none: a part is one upload, whole or absent."""
    if storage.is_local(parts):
        part_files = [part_path(parts, unit) for unit in units]
        remove_tmp(Path(p) for p in [*part_files, *map(part_done, part_files)])


def settings_of(cfg: CaptionConfig, source_cfg: SourceConfig, dtype: torch.dtype) -> dict:
    """Everything that changes the captions, by config key; reruns into the same parts must agree."""
    settings = {f"caption.{k}": v for k, v in asdict(cfg).items() if k != "output"}
    settings["caption.dtype"] = str(dtype).removeprefix("torch.")  # "auto" resolved on this device
    return {**settings, "data.source.kind": source_cfg.kind, "data.source.paths": list(source_cfg.paths)}


def check_settings(parts: str, settings: dict) -> None:
    """Refuse to mix captions made with other settings into existing parts (one line naming the key).
    Without a finished part there is nothing to mix with (a run that failed to start, e.g. a mistyped
    model id, can be rerun with other settings)."""
    path = storage.join(parts, SETTINGS)
    if not storage.exists(path) or not storage.names(parts, "*.done.json"):
        return
    old = json.loads(storage.read_text(path))
    for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
            raise CaptionError(f"{path}: parts were made with a different {key}; use another caption.output")


def assemble(units: list[Unit], parts: str, output: str) -> tuple[int, Skips, int]:
    """Concatenate the parts in unit order into ``output`` (atomically: a local temporary file, renamed
    or uploaded whole): (captions, skips, images)."""
    skips, captions, images = Skips(), 0, 0
    folder = Path(storage.parent(output)) if storage.is_local(output) else Path(tempfile.gettempdir())
    tmp = tmp_path(folder / storage.basename(output))
    dones = storage.read_many([part_done(part_path(parts, u)) for u in units])
    with open(tmp, "wb") as out:
        for unit in units:
            done = json.loads(dones[part_done(part_path(parts, unit))])
            skips.merge(done["skips"])
            captions, images = captions + done["captions"], images + done["images"]
            out.write(storage.read_bytes(part_path(parts, unit)))
    storage.upload(tmp, output)
    return captions, skips, images


def write_manifest(output: str, settings: dict, model_class: str, counts: tuple, units: int) -> dict:
    captions, skips, images = counts
    manifest = {
        "output": storage.basename(output),
        "model_class": model_class,
        "settings": settings,
        "units": units,
        "images": images,
        "captions": captions,
        "skipped": dict(skips.counts),
        "noted": dict(skips.noted),  # kept, with a note: animated_first_frame
        "skipped_examples": skips.examples,
    }
    storage.write_text(manifest_path(output), json.dumps(manifest, indent=1))
    return manifest


def run_caption(
    cfg: CaptionConfig, source_cfg: SourceConfig, accelerator, lock_timeout: float = 120.0
) -> dict | None:
    """The whole pass under an ``accelerate`` process group; rank 0 returns the manifest.  Units are
    shared with any other pass into the same output through per-unit locks (``data/unit_work.py``)."""
    output = str(cfg.output)
    parts = parts_dir(output)
    check_writable(parts, "caption.output")  # before the model loads (an object store: its client's)
    storage.makedirs(parts)
    source = open_images(source_cfg, cfg.output)
    units = source.units()
    settings = settings_of(cfg, source_cfg, resolve_dtype(cfg.dtype, accelerator.device))
    check_settings(parts, settings)
    accelerator.wait_for_everyone()  # every rank checked the settings before any write
    captioner = Captioner.load(cfg, accelerator.device)
    if accelerator.is_main_process:
        with refused_as_one_line(parts):  # equal to any older one (check_settings)
            storage.write_text(storage.join(parts, SETTINGS), json.dumps(settings, indent=1))
    start = time.perf_counter()
    background = tuple(source_cfg.alpha_background)
    images = caption_units(captioner, source, units, parts, accelerator, lock_timeout, background)
    images = int(accelerator.reduce(torch.tensor(images, device=accelerator.device), reduction="sum"))
    if not accelerator.is_main_process:
        return None
    with refused_as_one_line(storage.parent(output)):
        counts = assemble(units, parts, output)
        manifest = write_manifest(output, settings, type(captioner.model).__name__, counts, len(units))
    log_summary(manifest, images, output, time.perf_counter() - start)
    return manifest


@contextlib.contextmanager
def refused_as_one_line(folder: str) -> Iterator[None]:
    """A write ``folder`` refuses (full, read-only) becomes one line naming it; a temp file an atomic
    write or ``assemble`` left is removed."""
    try:
        yield
    except OSError as err:
        if not is_refused(err):
            raise
        if storage.is_local(folder):
            for tmp in Path(folder).glob(f"*.tmp-{os.getpid()}"):
                tmp.unlink(missing_ok=True)
        raise storage_error(folder, err) from None


def open_images(source_cfg: SourceConfig, output: str):
    """The source's reader, yielding images with or without a caption.  ``captions`` is dropped when
    it names this pass's own output: the pass writes that file, so it is never its input (nor hints)."""
    from dataclasses import replace

    own = source_cfg.captions == output
    return open_source(replace(source_cfg, captions=None) if own else source_cfg, need_captions=False)


def caption_units(
    captioner: Captioner,
    source,
    units: list[Unit],
    parts: str,
    accelerator,
    timeout: float,
    background: tuple[int, int, int],
) -> int:
    """Every unit captioned (by this pass or another), with a rank-0 progress bar counting images (its
    rate is images/s); returns the images this process read."""
    from tqdm.auto import tqdm

    bar = tqdm(unit="img", disable=not accelerator.is_main_process, desc=f"caption ({len(units)} units)")
    rank = accelerator.process_index
    locks, local = lock_folder(parts), storage.is_local(parts)
    work = UnitPass(
        name="caption",
        folder=Path(parts) if local else locks,
        lock_path=lambda u: locks / f"{storage.basename(part_path(parts, u))}.lock",
        done=lambda u: storage.exists(part_done(part_path(parts, u))),
        run=lambda u: caption_unit(captioner, source, u, parts, rank, bar, background),
        outputs=lambda u: [Path(part_path(parts, u)), Path(part_done(part_path(parts, u)))] if local else [],
        remove_tmp=lambda u: remove_stale_tmp([u], parts),
        lock_timeout=timeout,
    )
    try:
        with StopRequests(*PART_IN_FLIGHT, announce=accelerator.is_main_process) as stop:
            return work_through(units, work, accelerator, stop)
    finally:
        bar.close()  # its line ends before any message that follows


PART_IN_FLIGHT = ("finishing the unit in flight", "(it is redone next time)")  # the second Ctrl-C's line


def log_summary(manifest: dict, images: int, output: str, seconds: float) -> None:
    """Rank 0's end-of-pass line: captions, skips by reason, images captioned by this pass and images/s."""
    skipped = skipped_text(manifest)
    log.info(
        "caption: %d captions from %d units in %s; skipped %s (examples: %s); "
        "%d images read in this run in %.1fs, %.2f images/s",
        manifest["captions"],
        manifest["units"],
        output,
        skipped,
        manifest_path(output),
        images,
        seconds,
        images / max(seconds, 1e-9),
    )
