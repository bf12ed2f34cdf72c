"""``tristage`` command line: caption, cache, train, export, convert, sample, eval, app, demo, bench.

Bad input (config keys, paths, caches, checkpoints) ends with one line on stderr naming the file or
key, and exit code 2 -- no traceback: every such error is a ``tristage.errors.TristageError``.  Any
other exception is a bug and keeps its traceback (exit 1).

The command sits at the top of the namespace, above everything it dispatches to: imports run one way,
the CLI, then the demo and the benchmarks, then training / inference (``train/training``,
``train/inference``), then models / diffusion / conversion, then ``data/`` (``tests/unit/test_layout.py``
holds the order).  ``tristage demo`` and ``tristage bench`` need the command to reach ``demo/`` and
``bench/``; from inside ``train/`` that was an arrow back up from training to the demo, so the command
is ``tristage.cli`` (and ``python -m tristage``, ``tristage/__main__.py``), and ``train/`` has none.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from tristage.errors import TristageError
from tristage.stopping import Stopped


def cmd_caption(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from tristage.data.caption import run_caption
    from tristage.train.config import load_config
    from tristage.train.preflight import check_caption_paths

    cfg = load_config(args.config, args.overrides)
    check_caption_paths(cfg, args.config)
    run_caption(cfg.caption, cfg.data.source, Accelerator(), cfg.run.lock_timeout)  # rank 0 logs the summary


def cmd_cache(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from tristage.train.config import load_config
    from tristage.train.preflight import check_cache_paths
    from tristage.train.training.stage_cache import cache_stage

    cfg = load_config(args.config, args.overrides)
    check_cache_paths(cfg, args.config)
    # rank 0 logs the summary (samples, skips by reason, images/s)
    cache_stage(cfg, Accelerator(), rebuild=args.rebuild)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tristage.data import storage
    from tristage.disks import check_writable
    from tristage.train.config import load_config
    from tristage.train.preflight import check_train_paths
    from tristage.train.training.checkpoint_files import complete_checkpoints
    from tristage.train.training.remote_run import RunMirror
    from tristage.train.training.trainer import run_train

    cfg = load_config(args.config, args.overrides)
    # Markers and trainer.json only: the Trainer reads (and so verifies) the weights, once.
    has_checkpoint = cfg.resume != "none" and bool(
        RunMirror(cfg.run.dir).remote_steps()
        if storage.is_remote(cfg.run.dir)
        else complete_checkpoints(Path(cfg.run.dir) / "checkpoints")
    )
    check_train_paths(cfg, args.config, has_checkpoint)
    check_writable(cfg.run.dir, f"{args.config}: key 'run.dir'")  # before the model is built
    return run_train(cfg)["exit_status"]  # 130 after a Ctrl-C stop (tristage/stopping.py)


def cmd_export(args: argparse.Namespace) -> None:
    from tristage.train.inference.export import export

    print(export(args.run_dir, args.out))


def cmd_convert(args: argparse.Namespace) -> None:
    from tristage.train.conversion.init_from import convert_dit_to_pixart

    convert_dit_to_pixart(
        args.src,
        args.out,
        args.caption_channels,
        args.interpolation_scale,
        args.num_attention_heads,
        args.weights,
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from tristage.train.inference.sample import run_sample

    run_sample(args)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from tristage.train.inference.evaluate import run_eval

    print(json.dumps(run_eval(args)))


def cmd_app(args: argparse.Namespace) -> None:
    from tristage.train.inference.app import serve

    serve(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from tristage.demo.run import run_demo

    return run_demo(args.out, fast=args.fast, vae=args.vae).get("exit_status", 0)


def cmd_bench(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(f"tristage.bench.{BENCHES[args.which]}").main(args.rest)


# `tristage bench NAME` -> bench/NAME.py, installed as tristage.bench.NAME
BENCHES = {
    "resume": "resume",
    "cache": "cache",
    "train": "train",
    "caption": "caption",
    "convergence": "convergence",
}


def _with_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("config", help="stage YAML, e.g. configs/stage1_imagenet.yaml")
    sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    """`tristage eval`'s options (here, not in evaluate.py, whose torch imports ``--help`` must not pay)."""
    parser.add_argument("samples", nargs="?", help="a `tristage sample` output folder")
    parser.add_argument("--reference", help="reference images (folder) or statistics (.npz)")
    parser.add_argument("--inception", help="torch-fidelity Inception-v3 weights file (local)")
    parser.add_argument("--features", help="TorchScript feature extractor instead of Inception")
    parser.add_argument("--per-class", action="store_true", help="stage 1: FID per class, averaged")
    parser.add_argument("--clip", help="local CLIP folder for the CLIP score")
    parser.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE first")
    parser.add_argument("--save-stats", help="write the reference statistics to this .npz and exit")
    parser.add_argument(
        "--adherence", metavar="EXPORT_DIR", help="score an exported pipeline with --scorer (demo adherence)"
    )
    parser.add_argument(
        "--scorer", default="adherence", help="a registered scorer (entry points tristage.scorers)"
    )
    parser.add_argument("--per-prompt", type=int, default=8, help="adherence: samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="adherence: sampling seed")
    parser.add_argument("--out", help="also write the results here (JSON)")


def _convert_arguments(conv: argparse.ArgumentParser) -> None:
    conv_subs = conv.add_subparsers(dest="conversion", required=True)
    d2p = conv_subs.add_parser("dit-to-pixart", help="adaLN-single re-parameterisation of a DiT")
    d2p.add_argument(
        "src", help="stage-1 final/, official DiT .pt, DiT train.py checkpoint, or diffusers DiT folder"
    )
    d2p.add_argument("out", help="folder for the PixArtTransformer2DModel (save_pretrained layout)")
    d2p.add_argument(
        "--caption-channels", type=int, default=4096, help="T5 feature width of the new caption MLP"
    )
    d2p.add_argument("--interpolation-scale", type=float, default=None, help="default: the DiT's table (1.0)")
    d2p.add_argument(
        "--num-attention-heads", type=int, default=16, help="official .pt only (XL/L 16, B 12, S 6)"
    )
    d2p.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="of a DiT train.py checkpoint"
    )


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", required=True, help="output folder (data, caches, stages, exports, report)")
    demo.add_argument("--fast", action="store_true", help="a shortened run (tests): a few steps per stage")
    demo.add_argument(
        "--vae", default=None, help="another AutoencoderKL folder (default: the committed demo VAE)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option; imports nothing heavy (``tristage --help`` stays fast)."""
    from tristage.train.inference.app import add_app_arguments
    from tristage.train.inference.sample import add_sample_arguments

    parser = argparse.ArgumentParser(prog="tristage", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True)
    _with_config(subs.add_parser("caption", help="caption a stage's raw images with a VLM (LLaVA) -> JSONL"))
    cache = subs.add_parser("cache", help="run the frozen-encoder caching pass for a stage")
    _with_config(cache)
    cache.add_argument(
        "--rebuild",
        action="store_true",
        help="re-encode what is stale: every shard if the folder was built with another config, "
        "else the shards whose raw source files changed",
    )
    _with_config(subs.add_parser("train", help="train one stage (resumable; run under accelerate launch)"))
    exp = subs.add_parser("export", help="write a diffusers pipeline folder from a finished stage")
    exp.add_argument("run_dir", help="a stage's run.dir (its final/ is exported)")
    exp.add_argument("out", help="the pipeline folder to write")
    _convert_arguments(subs.add_parser("convert", help="weight conversions"))
    add_sample_arguments(subs.add_parser("sample", help="generate PNGs from an exported pipeline"))
    _eval_arguments(subs.add_parser("eval", help="FID, CLIP score, demo adherence (offline)"))
    add_app_arguments(subs.add_parser("app", help="local Gradio app around an exported pipeline"))
    bench = subs.add_parser("bench", help="benchmarks (JSON last line)")
    bench.add_argument("which", choices=sorted(BENCHES), help="which benchmark (bench/NAME.py)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    _demo_arguments(subs.add_parser("demo", help="the whole offline pipeline on synthetic shapes"))
    return parser


def show_progress() -> None:
    """tristage's own progress lines (``log.info``: resumed, summaries, cache and caption passes) and
    every library's warnings on stderr, one message per line; other libraries' INFO stays off."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tristage").setLevel(logging.INFO)


# A command returns its exit status, or None for 0.
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "caption": cmd_caption,
    "cache": cmd_cache,
    "train": cmd_train,
    "export": cmd_export,
    "convert": cmd_convert,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "app": cmd_app,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    show_progress()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except TristageError as err:  # the user's input or environment: one line; anything else is a bug
        print(f"tristage {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # stopped on request at a safe point: one line (rank 0); a rerun continues
        if str(stop):
            print(f"tristage {args.command}: {stop}", file=sys.stderr)
        return stop.exit_status
