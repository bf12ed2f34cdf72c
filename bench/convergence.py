"""``tristage bench convergence``: how many steps the demo's stage 1 needs to reach its committed shape
score, with and without REPA and token masking (issue 38, ``docs/cheaper-training.md``).

Each variant is ``demo/configs/stage1.yaml`` (the demo's own world: 1800 images, 2000 steps, batch 16)
with a few overrides, trained by the real Trainer from one cache pass, with a checkpoint every
``--every`` steps.  Each checkpoint's EMA weights are exported (``tristage export``'s ``DiTPipeline``
folder, loaded back with ``from_pretrained``) and scored by the demo's adherence classifier
(``demo/adherence.py``), every class ``--per-class`` times at each sampling seed, as the demo report
scores stage 1.  The target is the ``shape`` rate the
committed config reaches (the ``base`` variant at its last step, mean over the seeds) unless ``--target``
says otherwise; ``steps_to_target`` is the first checkpoint at or above it.  CPU seconds to each
checkpoint come from the Trainer's metric windows (images / img_per_s x cpu_util).

* ``base``: the committed config;
* ``repa``: ``objective.repa`` with the demo's encoder (``demo/assets/demo_encoder``: a 4-layer DINOv2
  trained on the demo's renders), at 64 px (its 8 x 8 patch grid is the DiT's), block 2 of 6 (REPA's 8 of
  28 scaled), lambda 0.5, projector width 128 (REPA's 2048 is 1.8 x SiT-XL's 1152; this is 2 x 64);
* ``mask``: ``train.mask`` ratio 0.5 (MaskDiT), unmasked for the last quarter (``until_step`` 1500);
* ``mask_deferred``: the same with deferred masking, block 1 of 6 as the patch-mixer (MicroDiT).

Everything lands in ``--workdir`` and is reused by a rerun (a trained variant and a scored checkpoint
are not redone), so the long run can be stopped and continued.  The last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "repa": ("objective.repa.encoder_resolution=64", "objective.repa.projector_dim=128"),
    "mask": ("train.mask.ratio=0.5", "train.mask.until_step=1500"),
    "mask_deferred": (
        "train.mask.ratio=0.5",
        "train.mask.until_step=1500",
        "train.mask.mode=deferred",
        "train.mask.mixer_blocks=1",
    ),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tristage bench convergence", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", default="base,repa,mask", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--every", type=int, default=250, help="steps between scored checkpoints")
    parser.add_argument(
        "--steps", type=int, default=None, help="train.max_steps (default: the config's 2000)"
    )
    parser.add_argument("--seeds", default="0,1", help="sampling seeds of the adherence report")
    parser.add_argument("--per-class", type=int, default=4, help="samples per class and seed (the demo's: 4)")
    parser.add_argument(
        "--target", type=float, default=None, help="shape rate to reach (default: base's last)"
    )
    parser.add_argument("--images", type=int, default=None, help="stage-1 images (default: the demo's 1800)")
    parser.add_argument("--workdir", type=Path, required=True, help="world, caches, runs and scores")
    return parser.parse_args(argv)


def variant_config(name: str, args: argparse.Namespace):
    """demo/configs/stage1.yaml for variant ``name``: its run folder, its cache (REPA's holds the
    encoder's features; the others share one) and its overrides."""
    from tristage.demo.encoders import demo_vision_encoder_path
    from tristage.demo.run import FULL, stage_config

    root, cache = args.workdir, "cache_repa" if name == "repa" else "cache"
    repa = (f"objective.repa.encoder={demo_vision_encoder_path()}",) if name == "repa" else ()
    overrides = (
        f"data.cache_dir={root / cache}",
        f"checkpoint.every={args.every}",
        "checkpoint.keep_last=1000",
        "tracking.mode=disabled",
        "validation.every=0",
        "validation.loss_every=0",  # the steps to the target are what is compared, not the evaluations
        "validation.metrics_every=0",
        *((f"train.max_steps={args.steps}",) if args.steps else ()),
        *repa,
        *VARIANTS[name],
    )
    scale = replace(FULL, stage1_images=args.images or FULL.stage1_images, overrides=overrides)
    return stage_config(1, root / name, {"stage1": root / "data"}, scale)


def train_variant(name: str, args: argparse.Namespace) -> Path:
    """Cache (once per cache folder) and train the variant unless its run finished; its run folder."""
    from accelerate import Accelerator

    from tristage.train.training.stage_cache import cache_stage
    from tristage.train.training.trainer import run_train

    cfg = variant_config(name, args)
    if not (Path(cfg.run.dir) / "final" / "COMPLETE").is_file():
        cache_stage(cfg, Accelerator(cpu=not torch.cuda.is_available()))
        run_train(cfg)
    return Path(cfg.run.dir)


def export_checkpoint(run_dir: Path, step: int) -> Path:
    """The pipeline folder of checkpoint ``step``'s EMA weights: a ``final/`` as the Trainer writes it
    (the transformer's ``save_pretrained`` and the config), then ``tristage export`` of it."""
    from safetensors.torch import load_file

    from tristage.train.config import load_config, save_config
    from tristage.train.families import family_of
    from tristage.train.inference.export import export
    from tristage.train.training.checkpoint_files import step_dir

    folder, out = step_dir(run_dir / "checkpoints", step), run_dir / "scored" / f"step_{step:07d}"
    if not (out / "export" / "model_index.json").is_file():
        cfg = load_config(folder / "config.yaml")
        model = family_of(cfg.model.family).build(cfg.model, 2 * cfg.model.in_channels)
        missing, unexpected = model.load_state_dict(load_file(folder / "ema.safetensors"), strict=False)
        if unexpected or {n for n, _ in model.named_parameters()} & set(missing):
            raise KeyError(f"{folder}: EMA does not fit the model ({missing[:3]}, {unexpected[:3]})")
        model.save_pretrained(out / "final" / "transformer")
        save_config(cfg, out / "final" / "config.yaml")
        export(out, out / "export")
    return out / "export"


def score_checkpoint(run_dir: Path, step: int, args: argparse.Namespace) -> dict:
    """The shape (kind) rate of checkpoint ``step`` at each sampling seed (kept in scores.json)."""
    from tristage.demo.adherence import load_pipeline, stage1_adherence

    cache = run_dir / "scores.json"
    scores = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{step}:{args.seeds}:{args.per_class}"
    if key not in scores:
        pipe = load_pipeline(export_checkpoint(run_dir, step))
        seeds = [int(s) for s in args.seeds.split(",")]
        scores[key] = [stage1_adherence(pipe, args.per_class, s)[0]["shape"] for s in seeds]
        cache.write_text(json.dumps(scores, indent=1))
    return {"step": step, "shape": scores[key], "mean": round(sum(scores[key]) / len(scores[key]), 4)}


def cpu_seconds(run_dir: Path) -> dict[int, float]:
    """Training CPU seconds to each logged step, from the Trainer's metric windows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total, last, out = 0.0, 0, {}
    for row in rows:
        images = row["samples_seen"] - last
        total += images / row["img_per_s"] * row["cpu_util"]
        last, out[row["step"]] = row["samples_seen"], round(total, 1)
    return out


def curve(name: str, args: argparse.Namespace) -> list[dict]:
    """The variant's scored checkpoints, in step order, with their CPU seconds."""
    from tristage.train.training.checkpoint_files import complete_checkpoints

    run_dir = train_variant(name, args)
    cpu = cpu_seconds(run_dir)
    steps = sorted(step for step, _ in complete_checkpoints(run_dir / "checkpoints"))
    return [{**score_checkpoint(run_dir, s, args), "cpu_s": cpu.get(s)} for s in steps]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from tristage.demo import synthetic
    from tristage.demo.run import FULL

    if not (args.workdir / "data" / "synsets.txt").is_file():
        # with the demo's held-out split: the stage config names it (data.val_paths)
        images = args.images or FULL.stage1_images
        synthetic.write_stage1(args.workdir / "data", images, held_out=FULL.held_out)
    names = args.variants.split(",")
    if args.target is None and "base" not in names:
        raise SystemExit("tristage bench convergence: without base in --variants, give --target")
    curves = {name: curve(name, args) for name in names}
    target = args.target if args.target is not None else curves["base"][-1]["mean"]
    result = {"target_shape": target, "seeds": args.seeds, "per_class": args.per_class, "variants": {}}
    for name, rows in curves.items():
        reached = next((row for row in rows if row["mean"] >= target), None)
        result["variants"][name] = {
            "steps_to_target": reached and reached["step"],
            "cpu_s_to_target": reached and reached["cpu_s"],
            "curve": rows,
        }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
