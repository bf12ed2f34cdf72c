"""``tristage bench caption``: the caption pass against a bare ``model.generate`` loop, in one run.

* ``caption_vs_bare``: captions/s of the pass's own per-unit loop (:func:`data.caption.caption_units`:
  read the tars, decode, sort by size, chat template + processor, batched left-padded
  ``generate``, decode the text, write the parts and their done markers) plus the final
  assembly, divided by captions/s of a bare loop that only calls ``model.generate`` on the
  *same* batches, prepared by the processor beforehand and already on the device.
  Model loading is outside both timers (a fixed cost, amortised at scale).  On CPU the
  ratio is in process-CPU seconds, on a GPU in wall seconds (``clock``); both are printed.

The model is a LLaVA of the same class as LLaVA-1.5, small and random (``demo/captioner.py``;
``--width --layers --image-side``), or any real one with ``--model PATH`` (a local folder or a
downloaded hub id).  Images are synthetic SA-style tars written to a temp dir.  Sides run
interleaved (``--repeats``), best of each.  The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def bench_config(root: Path, args: argparse.Namespace, model: str):
    from tristage.demo.run import CONFIGS
    from tristage.train.config import load_config

    raw, output = root / "raw", root / "out" / "captions.jsonl"
    return load_config(
        CONFIGS / "stage2.yaml",
        [
            f"data.source.paths=[{raw}/sa_*.tar]",
            f"data.source.captions={output}",  # as in the stage-2 config: the pass writes it
            f"caption.output={output}",
            f"caption.model={model}",
            f"caption.max_new_tokens={args.max_new_tokens}",
            f"caption.batch_size={args.batch}",
            f"caption.dtype={args.dtype}",
        ],
    )


def ours(cfg, captioner, accelerator) -> tuple[Clock, int]:
    """Clock and captions of the pass's per-unit loop + assembly, into a fresh output folder."""
    from tristage.data.caption import assemble, caption_units, parts_dir

    parts = parts_dir(cfg.caption.output)  # a path string (it may be a URL)
    shutil.rmtree(parts, ignore_errors=True)
    Path(parts).mkdir(parents=True)
    source = caption_source(cfg)
    units = source.units()
    clock = Clock(captioner.device)
    background = tuple(cfg.data.source.alpha_background)
    caption_units(captioner, source, units, parts, accelerator, cfg.run.lock_timeout, background)
    captions, _, _ = assemble(units, parts, str(cfg.caption.output))
    return clock.stop(), captions


def same_batches(cfg, captioner) -> list:
    """The processor inputs of every batch the pass makes, in its order (built outside the timer)."""
    from tristage.data.caption import unit_batches
    from tristage.data.sources import Skips

    source = caption_source(cfg)
    return [b for unit in source.units() for _, b in unit_batches(captioner, source, unit, Skips(), [0])]


def caption_source(cfg):
    """The reader exactly as the pass opens it."""
    from tristage.data.caption import open_images

    return open_images(cfg.data.source, cfg.caption.output)


@torch.no_grad()
def bare(captioner, batches: list) -> tuple[Clock, int, int]:
    """Clock, captions and new tokens of ``model.generate`` alone over ready batches."""
    kwargs = captioner.generation_kwargs()
    clock, rows, new = Clock(captioner.device), 0, 0
    for batch in batches:
        out = captioner.model.generate(**batch, **kwargs)  # (B, L_in + new)
        rows += out.shape[0]
        new += out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])
    return clock.stop(), rows, new


class Clock:
    """Wall and process-CPU seconds of one side (CUDA synchronised at both ends).

    On a shared CPU other processes stretch the wall clock but not the work, so on CPU the
    ratio is taken in process-CPU seconds (every thread of this process, the pass's read-ahead
    thread included); on a GPU, in wall seconds.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stop(self) -> Clock:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self

    def seconds(self) -> float:
        return self.wall if self.device.type == "cuda" else self.cpu


def write_world(root: Path, args: argparse.Namespace) -> str:
    """Synthetic SA tars and (without --model) the small random LLaVA; returns the model path."""
    from tristage.demo import synthetic
    from tristage.demo.captioner import TinyShape, write_captioner

    synthetic.write_stage2(root / "raw", args.images, size=args.image_px, per_shard=args.per_unit)
    if args.model is not None:
        return args.model
    shape = TinyShape(width=args.width, layers=args.layers, image_side=args.image_side, patch=args.patch)
    return str(write_captioner(root / "model", shape))


def measure(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    from tristage.data.caption import Captioner

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = bench_config(root, args, write_world(root, args))
        accelerator = Accelerator()
        captioner = Captioner.load(cfg.caption, accelerator.device)
        batches = same_batches(cfg, captioner)
        bare(captioner, batches[:1])  # warm-up: kernels, caches
        mine, theirs = [], []
        for _ in range(args.repeats):
            clock, captions = ours(cfg, captioner, accelerator)
            mine.append(clock)
            clock, rows, tokens = bare(captioner, batches)
            theirs.append(clock)
        best_ours, best_bare = (min(c.seconds() for c in side) for side in (mine, theirs))
        wall_ours, wall_bare = (min(c.wall for c in side) for side in (mine, theirs))
        return {
            "device": str(accelerator.device),
            "dtype": str(captioner.dtype).removeprefix("torch."),
            "model": args.model or f"random LLaVA width {args.width}, {args.layers} layers",
            "images": args.images,
            "batch": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "captions": captions,
            "new_tokens_per_caption": tokens / max(rows, 1),
            "captions_per_s": captions / best_ours,
            "bare_captions_per_s": rows / best_bare,
            "caption_vs_bare": (captions / best_ours) / (rows / best_bare),
            "clock": "wall" if accelerator.device.type == "cuda" else "process_cpu",
            "caption_vs_bare_wall": (captions / wall_ours) / (rows / wall_bare),
            "bare_new_tokens_per_s": tokens / best_bare,
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tristage bench caption", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images to caption")
    parser.add_argument("--per-unit", type=int, default=32, help="images per source tar (unit)")
    parser.add_argument("--image-px", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--batch", type=int, default=8, help="caption.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="caption.max_new_tokens")
    parser.add_argument("--dtype", default="auto", help="caption.dtype")
    parser.add_argument("--model", default=None, help="a real VLM folder instead of the random one")
    parser.add_argument("--width", type=int, default=256, help="random model: Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random model: layers")
    parser.add_argument("--image-side", type=int, default=64, help="random model: processor image side")
    parser.add_argument("--patch", type=int, default=8, help="random model: CLIP patch side")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; best of each side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU), the same for both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # shared CPUs: more threads than free cores only adds noise
    result = measure(args)
    print(
        f"caption pass {result['captions_per_s']:.2f} captions/s vs bare generate "
        f"{result['bare_captions_per_s']:.2f} captions/s: {result['caption_vs_bare']:.3f}"
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
