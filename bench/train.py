"""``tristage bench train``: the real Trainer against a bare training loop, in the same process.

Both run the same model (same config, same seed, same speed options) on the same batches (a synthetic
feature cache of the chosen shape, written to a temp dir and read back through the real loader):

* **trainer**: ``Trainer.train()`` -- loader thread, EMA, grad clipping, the NaN guard, metric windows,
  the progress bar (no mid-run checkpoints; the final save comes after the timed steps);
* **bare**: the batches already on the device; ``Objective.loss`` forward, backward, AdamW step,
  ``zero_grad`` -- nothing else.

Throughput is measured in windows of ``--window`` steps after a first, untimed window: for the trainer
its own metric windows (``train.log_every = --window``; ``metrics.jsonl`` holds images / seconds between
log flushes and the share of it spent waiting on the loader), for the bare loop the same step counts.
Runs alternate, ``--repeats`` of each, and the fastest window of each kind counts: on a shared machine
other processes only ever slow a window down, so the best window is the closest to the code's own cost
(the means are reported too).  Reported: img/s of each,
``overhead_vs_bare = trainer_time / bare_time - 1``, TFLOP/s from ``train.flops.train_flops_per_image``,
MFU against ``--peak-tflops`` (default: 989, H100 dense bf16, on CUDA; on CPU a fp32 matmul peak measured
in this run with the same thread count), peak memory (CUDA max allocated, else the process's peak RSS)
and the data-wait share.  The last line printed is the JSON summary.

``--mask-ratio R`` and ``--repa`` measure an option instead (issue 38, ``docs/cheaper-training.md``):
Trainer runs with and without it, alternating ``--repeats`` times on the same batches, throughput from
the Trainer's own metric windows on the device's clock.  ``masked_vs_full_img_per_s`` is the images per
second with ``train.mask.ratio = R`` over those without; ``repa_overhead`` is the extra time per image
with ``objective.repa`` (cached encoder features of ``--encoder-width`` on the DiT's token grid, as
DINOv2-B gives at 224 px for 256 px images, and a projector of ``--projector-dim``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tristage bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", help="model size, a key of train/models/sizes.py SIZES")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch", type=int, default=8, help="images per micro-batch (data.batch_size)")
    parser.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum: micro-batches per step")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per run (a multiple of --window)")
    parser.add_argument("--window", type=int, default=4, help="steps per timing window; one untimed first")
    parser.add_argument("--repeats", type=int, default=3, help="alternating bare / trainer runs")
    parser.add_argument("--text-tokens", type=int, default=120, help="caption length L (T5 tokens)")
    parser.add_argument("--caption-channels", type=int, default=4096, help="T5 width (4096 = T5-XXL)")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile per block")
    parser.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing")
    parser.add_argument("--attention", default="sdpa", help="model.attention_backend: sdpa | xformers")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (TFLOP/s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (compute)")
    parser.add_argument("--workdir", default=None, help="keep the cache and runs here (default: temp)")
    comparison_arguments(parser)
    return parser.parse_args(argv)


def comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """What a run compares or adds: parallelisms, the validation loss, token masking, REPA."""
    parser.add_argument(
        "--parallelism",
        default=None,
        help="compare train.parallelism values instead (comma-separated, e.g. ddp,fsdp,fsdp_grad_op): "
        "each a Trainer run of --processes processes, alternating --repeats times",
    )
    parser.add_argument("--processes", type=int, default=2, help="with --parallelism: processes per run")
    parser.add_argument("--label", default=None, help="a name for this figure, copied into the JSON line")
    parser.add_argument(
        "--val-loss-every",
        type=int,
        default=0,
        help="validation.loss_every for the Trainer runs: also report the share of wall time val/loss takes",
    )
    parser.add_argument("--val-samples", type=int, default=64, help="held-out samples val/loss reads")
    parser.add_argument("--mask-ratio", type=float, default=None, help="compare train.mask.ratio R with none")
    parser.add_argument("--mask-mode", default="random", help="with --mask-ratio: train.mask.mode")
    parser.add_argument("--repa", action="store_true", help="compare objective.repa with none")
    parser.add_argument(
        "--encoder-width", type=int, default=768, help="with --repa: encoder width (DINOv2-B)"
    )
    parser.add_argument(
        "--projector-dim", type=int, default=2048, help="with --repa: objective.repa.projector_dim"
    )


def bench_config(root: Path, args: argparse.Namespace, device: torch.device, extra: tuple[str, ...] = ()):
    """A PixArt stage config of the shape asked for (and ``extra`` overrides), reading ``root/cache``."""
    from omegaconf import OmegaConf

    from tristage.train.config import Config

    overrides = [
        f"run.dir={root / 'run'}",
        "run.name=bench",
        "resume=none",
        "model.family=pixart",
        f"model.size={args.size}",
        f"model.sample_size={args.resolution // 8}",
        f"model.caption_channels={args.caption_channels}",
        f"model.gradient_checkpointing={args.checkpointing}",
        f"model.attention_backend={args.attention}",
        "data.source.kind=sam_llava",
        f"data.cache_dir={root / 'cache'}",
        f"data.resolution={args.resolution}",
        f"data.batch_size={args.batch}",
        f"data.shuffle_buffer={2 * args.batch}",
        f"encoders.vae={root / 'no-vae'}",
        f"encoders.text_encoder={root / 'no-t5'}",
        f"encoders.tokenizer={root / 'no-t5'}",
        f"encoders.max_tokens={args.text_tokens}",
        "optim.lr=1e-4",
        "optim.warmup_steps=1",
        "optim.grad_clip=1.0",
        f"train.max_steps={args.window + args.steps}",
        f"train.grad_accum={args.grad_accum}",
        f"train.mixed_precision={'bf16' if device.type == 'cuda' else repr('no')}",  # YAML reads no as false
        f"train.log_every={args.window}",
        f"train.compile={args.compile}",
        "checkpoint.every=1000000000",
        "checkpoint.keep_last=1",
        "tracking.mode=disabled",
        *val_overrides(args, extra),
    ]
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)


def val_overrides(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> list[str]:
    """--val-loss-every N: a held-out split (``write_cache`` writes it) and its loss every N steps; then
    ``extra``."""
    if not args.val_loss_every:
        return list(extra)
    return ["data.val_fraction=0.01", f"validation.loss_every={args.val_loss_every}", *extra]


def write_cache(cfg, samples: int, held_out: int = 0, repa_width: int | None = None) -> None:
    """Random features in the cache format (feature shards + manifest with the config's fingerprint), and
    ``held_out`` more in ``val/`` (the held-out split val/loss reads); ``repa_width``: with REPA encoder
    features of that width on the DiT's token grid (what DINOv2-B's 16 x 16 patch tokens at 224 px are
    for a 256 px image)."""
    from safetensors.torch import save_file

    from tristage.data.cache_format import NULL_CAPTION
    from tristage.data.val_split import val_dir

    cache, text = Path(cfg.data.cache_dir), (cfg.encoders.max_tokens, cfg.model.caption_channels)
    write_features(cfg, cache, samples, seed=0, repa_width=repa_width)
    save_file({"t5": torch.zeros(*text).bfloat16()}, cache / NULL_CAPTION)
    if held_out:
        write_features(cfg, val_dir(cache), held_out, seed=1, repa_width=repa_width)


def write_features(cfg, folder: Path, samples: int, seed: int, repa_width: int | None) -> None:
    """One shard of ``samples`` random samples and its manifest in ``folder``."""
    import webdataset as wds
    from safetensors.torch import save

    from tristage.data.cache_format import MANIFEST, NULL_CAPTION, sample_json
    from tristage.train.models.sizes import size_of
    from tristage.train.training.stage_cache import expected_fingerprint

    res = cfg.data.resolution
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    side, text = res // 8, (cfg.encoders.max_tokens, cfg.model.caption_channels)
    grid = side // size_of(cfg.model.size).patch_size
    with wds.TarWriter(str(folder / "shard-000000.tar")) as writer:
        for i in range(samples):
            tensors = {
                "mean": torch.randn(4, side, side, generator=g).bfloat16(),
                "std": torch.rand(4, side, side, generator=g).bfloat16() * 0.1,
                "t5": torch.randn(*text, generator=g).bfloat16(),
            }
            if repa_width is not None:
                tensors["repa"] = torch.randn(grid, grid, repa_width, generator=g).bfloat16()
            meta = {"key": f"{seed}_{i:06d}", "caption": "", "label": None, "score": None, "tokens": text[0]}
            meta.update(original_size=[res, res], crop=[0, 0], bucket=[res, res])
            feat = save(tensors)
            writer.write({"__key__": meta["key"], "feat.safetensors": feat, "json": sample_json(meta, feat)})
    manifest = {
        "fingerprint": expected_fingerprint(cfg),
        "shards": [{"file": "shard-000000.tar", "samples": samples}],
        "samples": samples,
        "scaling_factor": 0.18215,
        "class_names": {},
        "null_caption": NULL_CAPTION,
        "skipped": {},
    }
    if repa_width is not None:
        manifest["repa_width"] = repa_width
    (folder / MANIFEST).write_text(json.dumps(manifest))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_trainer(cfg, run_dir: Path) -> list[dict[str, float]]:
    """One Trainer run: its metric windows after the first, as wall, data-wait and CPU seconds (those
    holding a validation loss left out); its wall time into ``run_dir/summary.json``."""
    from tristage.train.training.trainer import Trainer

    cfg.run.dir = str(run_dir)
    summary = Trainer(cfg).train()
    (run_dir / "summary.json").write_text(json.dumps({"wall_s": summary["wall_s"]}))
    images = cfg.train.log_every * cfg.data.batch_size * cfg.train.grad_accum
    return metric_windows(run_dir, images, every=cfg.validation.loss_every)


def metric_windows(run_dir: Path, images: int, processes: int = 1, every: int = 0) -> list[dict[str, float]]:
    """Rank 0's metric windows after the first, as wall, data-wait and CPU seconds; with several
    processes the CPU seconds are the whole job's (rank 0's share times the processes: ranks are alike).
    ``every``: validation.loss_every -- a window that began with a validation loss is left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "img_per_s" in r]  # the training windows, not the val/* rows
    windows = []
    for before, w in zip(rows, rows[1:]):
        if every and (w["step"] - 1) // every >= -(-before["step"] // every):
            continue  # a validation loss ran at a step in [before, w): after before's flush, or within
        seconds = images / w["img_per_s"]
        cpu = processes * w["cpu_util"] * seconds
        windows.append({"s": seconds, "wait_s": w["data_wait_share"] * seconds, "cpu_s": cpu})
    return windows


def loader_batches(cfg, count: int, device: torch.device) -> list[dict]:
    """The first ``count`` micro-batches of the loader the Trainer builds (same spec, same stream)."""
    from tristage.data.features import FeatureLoader, LoaderSpec, sample_latents
    from tristage.train.diffusion.objective import Objective
    from tristage.train.families import family_of

    data = cfg.data
    k, seed, buffer, dropout = cfg.train.grad_accum, cfg.train.seed, data.shuffle_buffer, data.cond_dropout
    spec = LoaderSpec(data.batch_size, k, 0, 1, seed, buffer, dropout, 0)
    objective, family = Objective(cfg.objective), family_of(cfg.model.family)
    out, batches = [], iter(FeatureLoader(cfg.data.cache_dir, spec))
    for _ in range(count):
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
        latents, noise = sample_latents(b, device)
        cond = family.inputs(b)
        timesteps = objective.timesteps_from_uniform(b["u"])
        out.append({"latents": latents, "cond": cond, "noise": noise, "timesteps": timesteps})
    return out


def run_bare(cfg, batches: list[dict], window: int, device: torch.device) -> list[dict[str, float]]:
    """Wall and process-CPU seconds per window of ``window`` steps of forward + backward (of each of the
    ``train.grad_accum`` micro-batches) + AdamW, after the first window."""
    from accelerate.utils import set_seed

    from tristage.train.diffusion.objective import Objective
    from tristage.train.families import family_of
    from tristage.train.models.speed import build_for_training

    set_seed(cfg.train.seed)
    build = family_of(cfg.model.family).build
    model = build_for_training(build, cfg.model, 2 * cfg.model.in_channels, cfg.train.compile).to(device)
    fused = device.type == "cuda"
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=fused, foreach=not fused)
    objective = Objective(cfg.objective)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    marks, k = [], cfg.train.grad_accum
    for i, b in enumerate(batches):
        if i % (window * k) == 0:
            sync(device)
            marks.append((time.perf_counter(), time.process_time()))
        inputs = {"latents": b["latents"], "cond": b["cond"]}
        with autocast:
            loss, _ = objective.loss(model, inputs, noise=b["noise"], timesteps=b["timesteps"])
        (loss / k).backward()
        if i % k == k - 1:
            optim.step()
            optim.zero_grad(set_to_none=True)
    sync(device)
    marks.append((time.perf_counter(), time.process_time()))
    return [{"s": b[0] - a[0], "cpu_s": b[1] - a[1]} for a, b in zip(marks[1:], marks[2:])]


def cpu_matmul_tflops(repeats: int = 10, n: int = 1024) -> float:
    """Best fp32 matmul TFLOP per process-CPU-second at the current thread count (the CPU MFU peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t0 = time.process_time()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / max(time.process_time() - t0, 1e-9) / 1e12)
    return best


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timed_repeats(cfg, args: argparse.Namespace, root: Path, batches, device: torch.device):
    """The bare loop and the Trainer, alternately, ``args.repeats`` times: (trainer windows, bare windows,
    the per-repeat CPU overhead), so a slow moment on a shared machine hits both."""
    trainer, bare, by_repeat = [], [], []
    images = args.window * args.batch * args.grad_accum
    for r in range(args.repeats):
        bare_r, trainer_r = run_bare(cfg, batches, args.window, device), run_trainer(cfg, root / f"run{r}")
        bare, trainer = bare + bare_r, trainer + trainer_r
        by_repeat.append(
            timing(bare_r, images)["img_per_cpu_s"] / timing(trainer_r, images)["img_per_cpu_s"] - 1
        )
    return trainer, bare, by_repeat


def measure(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    from tristage.train.models.flops import image_tokens, train_flops_per_image
    from tristage.train.models.sizes import size_of

    cfg = bench_config(root, args, device)
    write_cache(cfg, 4 * args.batch * args.grad_accum, args.val_samples if args.val_loss_every else 0)
    batches = loader_batches(cfg, (args.window + args.steps) * args.grad_accum, device)
    images = args.window * args.batch * args.grad_accum
    trainer, bare, by_repeat = timed_repeats(cfg, args, root, batches, device)
    ours, theirs = timing(trainer, images), timing(bare, images)
    tokens = image_tokens(args.resolution, size_of(args.size).patch_size)
    flops = train_flops_per_image(cfg.model, tokens, args.text_tokens)
    clock = CLOCKS[device.type]  # the seconds that count: wall on CUDA, CPU seconds on CPU
    peak, peak_source = peak_tflops(args, device)
    tflops = flops * ours[clock] / 1e12
    return {
        "device": device_name(device, args.threads),
        "size": args.size,
        "resolution": args.resolution,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "steps": args.steps * args.repeats,
        "img_per_s": round(ours["img_per_s"], 3),
        "bare_img_per_s": round(theirs["img_per_s"], 3),
        "img_per_cpu_s": round(ours["img_per_cpu_s"], 3),
        "bare_img_per_cpu_s": round(theirs["img_per_cpu_s"], 3),
        "overhead_vs_bare": round(theirs[clock] / ours[clock] - 1, 4),
        "overhead_wall": round(theirs["img_per_s"] / ours["img_per_s"] - 1, 4),
        "overhead_cpu": round(theirs["img_per_cpu_s"] / ours["img_per_cpu_s"] - 1, 4),
        "overhead_cpu_by_repeat": [round(o, 4) for o in by_repeat],
        "clock": clock,
        "tflops": round(tflops, 5),
        "bare_tflops": round(flops * theirs[clock] / 1e12, 5),
        "mfu": round(tflops / peak, 4),
        "peak_tflops": round(peak, 4),
        "peak_source": peak_source,
        "flops_per_image": flops,
        "peak_mem_gb": round(peak_memory_gb(device), 3),
        "data_wait_share": round(sum(w["wait_s"] for w in trainer) / sum(w["s"] for w in trainer), 4),
    }


def val_figures(root: Path, repeats: int, result: dict) -> dict:
    """What val/loss cost in the Trainer runs: its share of their wall time, seconds per evaluation, and
    its forward rows (held-out samples x timesteps) per second against the training images per second,
    both by the run's clock (the ratio that carries to another device: docs/evaluation.md estimates a
    GPU run's share with it)."""
    seconds, cpu, wall, timesteps = [], [], 0.0, 0
    for run_dir in (root / f"run{r}" for r in range(repeats)):
        found = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        found = [r for r in found if "val/loss" in r]
        seconds, cpu = (
            seconds + [r["val/seconds"] for r in found],
            cpu + [r["val/cpu_seconds"] for r in found],
        )
        timesteps = len([k for k in found[0] if k.startswith("val/loss_t")])
        wall += json.loads((run_dir / "summary.json").read_text())["wall_s"]
    samples = json.loads((root / "cache" / "val" / "manifest.json").read_text())["samples"]
    per_eval = {"img_per_s": sum(seconds) / len(seconds), "img_per_cpu_s": sum(cpu) / len(cpu)}
    rows_per_s = samples * timesteps / per_eval[result["clock"]]
    return {
        "val_samples": samples,
        "val_evaluations": len(seconds),
        "val_seconds_per_evaluation": round(per_eval["img_per_s"], 4),
        "val_cpu_seconds_per_evaluation": round(per_eval["img_per_cpu_s"], 4),
        "val_share_of_wall": round(sum(seconds) / wall, 4),
        "val_rows_per_s": round(rows_per_s, 3),  # by the clock that counts (result["clock"])
        "val_rows_per_training_image": round(rows_per_s / result[result["clock"]], 3),
    }


# Which throughput counts: on a GPU the wall clock; on a CPU the process's CPU seconds, because the CPU
# *is* the device there and other processes on a shared machine stretch the wall clock, not the work.
CLOCKS = {"cuda": "img_per_s", "cpu": "img_per_cpu_s"}


def timing(windows: list[dict[str, float]], images: int) -> dict[str, float]:
    """img/s of the fastest window (others' load only ever slows one down) and img per CPU-second over
    all windows (CPU time is not stretched by others' load)."""
    return {
        "img_per_s": images / min(w["s"] for w in windows),
        "img_per_cpu_s": images * len(windows) / sum(w["cpu_s"] for w in windows),
    }


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        return H100_BF16_DENSE_TFLOPS, "H100 dense bf16 (default)"
    return cpu_matmul_tflops(), f"measured fp32 matmul per CPU-second, {torch.get_num_threads()} thread(s)"


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread(s)"


def launch_worker(cfg, run_dir: Path, processes: int, threads: int) -> list[dict]:
    """One Trainer run of ``processes`` ranks (torchrun; gloo on CPU, NCCL on CUDA); per-rank reports."""
    from tristage.train.config import save_config

    cfg.run.dir = str(run_dir)
    save_config(cfg, run_dir / "stage.yaml")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*run, "-m", "tristage.bench.train_worker", str(run_dir / "stage.yaml"), str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's gloo (MULTI_CPU) path, as in the CPU tests
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{cfg.train.parallelism} run in {run_dir} failed: {result.stderr[-3000:]}")
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(processes)]


def compare_parallelism(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    """Each ``--parallelism`` value as a run of ``--processes`` ranks, alternating, same batches and seed:
    throughput from the Trainer's own metric windows (after the first), memory from every rank."""
    cfg = bench_config(root, args, device)
    write_cache(cfg, samples=4 * args.batch * args.processes * args.grad_accum)
    choices, images = args.parallelism.split(","), args.window * args.batch * args.processes * args.grad_accum
    windows: dict[str, list] = {p: [] for p in choices}
    ranks: dict[str, list] = {}
    for r in range(args.repeats):
        for parallelism in choices:
            cfg.train.parallelism = parallelism
            run_dir = root / f"{parallelism}{r}"
            reports = launch_worker(cfg, run_dir, args.processes, args.threads)
            ranks[parallelism] = [max_report(a, b) for a, b in zip(ranks.get(parallelism, reports), reports)]
            windows[parallelism] += metric_windows(run_dir, images, args.processes)
    runs = {p: parallel_figures(windows[p], ranks[p], images) for p in choices}
    base = runs[choices[0]]
    for figures in runs.values():
        figures["throughput_vs_first"] = round(figures[CLOCKS[device.type]] / base[CLOCKS[device.type]], 4)
        figures["state_vs_first"] = round(figures["state_mb_per_rank"] / base["state_mb_per_rank"], 4)
    head = {"device": device_name(device, args.threads), "processes": args.processes, "size": args.size}
    head.update(resolution=args.resolution, batch_per_process=args.batch, steps=args.steps * args.repeats)
    return {**head, "clock": CLOCKS[device.type], "runs": runs}


def max_report(a: dict, b: dict) -> dict:
    """One rank's report over two repeats: the higher peak memory (the state is the same)."""
    return {**b, "peak_mem_gb": max(a["peak_mem_gb"], b["peak_mem_gb"])}


def parallel_figures(windows: list[dict], ranks: list[dict], images: int) -> dict:
    """img/s and img per CPU-second of one strategy, peak memory of each rank, training state per rank."""
    state = [sum(r["state_bytes"].values()) / 2**20 for r in ranks]
    return {
        **{k: round(v, 3) for k, v in timing(windows, images).items()},
        "peak_mem_gb_per_rank": [r["peak_mem_gb"] for r in ranks],
        "state_mb_per_rank": round(max(state), 3),
        "state_mb_by_part": {k: round(v / 2**20, 3) for k, v in ranks[0]["state_bytes"].items()},
    }


def option_overrides(args: argparse.Namespace, root: Path) -> tuple[str, list[str], list[str]]:
    """(name, overrides, what to print of them) of the option ``--mask-ratio`` or ``--repa`` measures."""
    if args.repa:
        settings = [
            f"objective.repa.projector_dim={args.projector_dim}",
            f"encoder width {args.encoder_width}",
        ]
        # The encoder is never loaded (its features are cached): a path that does not exist will do.
        return "repa", [f"objective.repa.encoder={root / 'no-encoder'}", settings[0]], settings
    overrides = [f"train.mask.ratio={args.mask_ratio}", f"train.mask.mode={args.mask_mode}"]
    return "masked", overrides, overrides


def compare_option(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    """Trainer runs without and with the option, alternating ``--repeats`` times, each on its own
    synthetic cache of the same batches (the REPA one also holds the encoder features)."""
    name, extra, settings = option_overrides(args, root)
    base, option = bench_config(root / "base", args, device), bench_config(root / name, args, device, extra)
    samples = 4 * args.batch * args.grad_accum
    write_cache(base, samples)
    write_cache(option, samples, repa_width=args.encoder_width if args.repa else None)
    windows: dict[str, list] = {"full": [], name: []}
    for r in range(args.repeats):
        for key, cfg in (("full", base), (name, option)):
            windows[key] += run_trainer(cfg, root / f"{key}{r}")
            shutil.rmtree(root / f"{key}{r}")  # its final checkpoint: ~12 GB at XL/2 (weights, AdamW, EMA)
    images, clock = args.window * args.batch * args.grad_accum, CLOCKS[device.type]
    full, other = timing(windows["full"], images), timing(windows[name], images)
    head = {"device": device_name(device, args.threads), "size": args.size, "resolution": args.resolution}
    head.update(batch=args.batch, steps=args.steps * args.repeats, clock=clock, option=settings)
    figures = {f"{k}_{c}": round(v, 3) for k, t in (("full", full), (name, other)) for c, v in t.items()}
    if args.repa:
        return {**head, **figures, "repa_overhead": round(full[clock] / other[clock] - 1, 4)}
    return {**head, **figures, "masked_vs_full_img_per_s": round(other[clock] / full[clock], 4)}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.parallelism:
            result = compare_parallelism(args, Path(args.workdir or tmp), device)
        elif args.mask_ratio is not None or args.repa:
            result = compare_option(args, Path(args.workdir or tmp), device)
        else:
            result = measure(args, Path(args.workdir or tmp), device)
            if args.val_loss_every:
                figures = val_figures(Path(args.workdir or tmp), args.repeats, result)
                result = {**result, "val_loss_every": args.val_loss_every, **figures}
    if args.label is not None:
        result = {"figure": args.label, **result}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
