"""``tristage demo --out DIR``: the whole offline pipeline on the synthetic shapes world.

synthetic raw shards -> cache (frozen demo VAE + tiny T5) -> stage 1 (DiT) ->
stage 2 (PixArt, re-parameterised from stage 1) -> stage 3 (96 px, square,
score filter) -> exports (DiTPipeline, PixArtAlphaPipeline) ->
adherence report, sample grid and loss curves.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tristage.demo import synthetic
from tristage.demo.encoders import demo_vae_path, write_demo_text_encoder
from tristage.stopping import SIGNALS, Stopped, StopRequests, exit_status
from tristage.train.config import Config, load_config, save_config

log = logging.getLogger("tristage.demo")
CONFIGS = Path(__file__).resolve().parent / "configs"  # stageN.yaml, shipped as package data


@dataclass(frozen=True)
class Scale:
    """Dataset sizes and step counts of a demo run."""

    stage1_images: int
    stage2_images: int
    stage3_images: int
    steps: tuple[int, int, int] | None  # None: each config's own train.max_steps (= its validation.every)
    samples_per_prompt: int
    overrides: tuple[str, ...] = ()  # extra config overrides for every stage
    held_out: int = 48  # images per stage in the source's own validation split (data.val_paths): val/loss


FULL = Scale(1800, 1920, 1440, None, 8)  # stage 3: 1440, not 720 (demo/configs/stage3.yaml)
FAST = Scale(
    144,
    144,
    72,
    (6, 6, 4),
    2,
    ("data.batch_size=8", "checkpoint.every=3", "train.log_every=2", "validation.loss_every=2"),
    held_out=8,
)


def write_world(root: Path, scale: Scale) -> dict[str, Path]:
    """Raw source shards for the three stages, in the formats the real readers consume, each with a
    held-out split drawn after the training images (which it leaves unchanged)."""
    held = scale.held_out
    return {
        "stage1": synthetic.write_stage1(root / "stage1", scale.stage1_images, held_out=held),
        "stage2": synthetic.write_stage2(root / "stage2", scale.stage2_images, held_out=held),
        "stage3": synthetic.write_stage3(root / "stage3", scale.stage3_images, held_out=held),
    }


def source_overrides(n: int, raw: Path) -> list[str]:
    """The ``data.source`` keys of demo stage ``n`` for its raw world in ``raw`` (write_world's layout)."""
    return {
        1: [f"data.source.paths=[{raw}/imagenet-*.tar]", f"data.source.synsets={raw / 'synsets.txt'}"],
        2: [f"data.source.paths=[{raw}/sa_*.tar]", f"data.source.captions={raw / 'llava_captions.jsonl'}"],
        3: [f"data.source.paths=[{raw / 'images'}]", f"data.source.metadata={raw / 'metadata.jsonl'}"],
    }[n]


def val_overrides(n: int, raw: Path) -> list[str]:
    """``data.val_paths`` of demo stage ``n``: the held-out split ``write_world`` draws (val/loss)."""
    return [f"data.val_paths=[{raw / 'val' / {1: 'imagenet-*.tar', 2: 'sa_*.tar', 3: 'images'}[n]}]"]


def stage_config(n: int, out: Path, data: dict[str, Path], scale: Scale, vae: Path | None = None) -> Config:
    """demo/configs/stageN.yaml with this run's paths filled in."""
    enc, raw = out / "encoders", data[f"stage{n}"]
    overrides = [
        f"run.dir={out / f'stage{n}'}",
        f"data.cache_dir={out / 'cache' / f'stage{n}'}",
        f"encoders.vae={vae or demo_vae_path()}",
    ]
    if scale.steps is not None:
        steps = scale.steps[n - 1]  # and one grid and one metrics evaluation per stage, at its last step
        overrides += [
            f"train.max_steps={steps}",
            f"validation.every={steps}",
            f"validation.metrics_every={steps}",
        ]
    if n > 1:
        overrides += [
            f"init_from={out / f'stage{n - 1}' / 'final'}",
            f"encoders.text_encoder={enc / 'text_encoder'}",
            f"encoders.tokenizer={enc / 'tokenizer'}",
        ]
    overrides += source_overrides(n, raw) + val_overrides(n, raw) + list(scale.overrides)
    return load_config(CONFIGS / f"stage{n}.yaml", overrides)


@dataclass
class StopSignals:
    """Whether a stop (SIGTERM, SIGUSR1, Ctrl-C) arrived at any point of the demo, whoever handled it.

    While a stage caches or trains, that pass's own handlers catch a stop (it finishes the unit or saves,
    and returns); between them this class's handler (``tristage/stopping.py``: a second Ctrl-C warns, a
    third aborts) keeps the default action (death) away.  Python writes the number of every signal it
    catches to the wakeup fd, whichever Python handler then runs, so a stop the trainer took after its
    last step is seen here too, and the demo never starts the next stage.
    """

    seen: list[int] = field(default_factory=list)  # stop signals in the order they arrived
    _fds: tuple[int, int] = (-1, -1)
    _previous_fd: int = -1
    _requests: StopRequests = field(default_factory=lambda: StopRequests("stopping", "now"))

    def __enter__(self) -> StopSignals:
        self._fds = os.pipe()
        for fd in self._fds:
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._fds[1], warn_on_full_buffer=False)
        self._requests.install()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        self._requests.restore()
        for fd in self._fds:
            os.close(fd)

    def requested(self) -> bool:
        try:
            self.seen += [n for n in os.read(self._fds[0], 4096) if n in SIGNALS]
        except BlockingIOError:  # nothing caught since the last look
            pass
        return bool(self.seen)

    def exit_status(self) -> int:
        """The demo's exit status after a stop: 130 when the first stop was Ctrl-C, else 0."""
        self.requested()  # a stop a pass handled and returned from may not have been looked at yet
        return exit_status(self.seen[0]) if self.seen else 0


def run_stage(cfg: Config, stop: StopSignals) -> dict | None:
    """Cache and train one stage; None when a stop arrived (the trainer then saved a checkpoint)."""
    from accelerate import Accelerator

    from tristage.train.training.stage_cache import cache_stage
    from tristage.train.training.trainer import run_train

    save_config(cfg, Path(cfg.run.dir) / "config.yaml")
    try:
        manifest = cache_stage(cfg, Accelerator())
    except Stopped:  # the cache pass finished its unit in flight and stopped: seen by `stop` too
        return None
    log.info("%s: cached %d samples, skipped %s", cfg.run.name, manifest["samples"], manifest["skipped"])
    if stop.requested():
        return None
    summary = run_train(cfg)
    if stop.requested() or not (Path(cfg.run.dir) / "final" / "COMPLETE").is_file():
        return None
    plot_loss(Path(cfg.run.dir))
    return summary


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows: training windows (``loss``, ...) and evaluations (``val/*``)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot_loss(run_dir: Path) -> Path:
    """loss.png from metrics.jsonl: the training loss and the validation loss (val/loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_rows(run_dir)
    train, val = [r for r in rows if "loss" in r], [r for r in rows if "val/loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], marker="o", ms=3, label="training loss")
    if val:
        steps, losses = [r["step"] for r in val], [r["val/loss"] for r in val]
        ax.plot(steps, losses, marker="s", ms=4, label="val/loss (held out, 8 fixed timesteps)")
    ax.set(xlabel="step", ylabel="loss (MSE + VLB)", title=run_dir.name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"


def loss_fell(run_dir: Path) -> bool:
    rows = [r for r in metric_rows(run_dir) if "loss" in r]
    return len(rows) >= 2 and rows[-1]["loss"] < rows[0]["loss"]


def online_evaluation(run_dir: Path) -> dict:
    """A stage's last validation figures during training: val/loss (and its best) and the demo adherence."""
    rows = metric_rows(run_dir)
    val, metrics = [r for r in rows if "val/loss" in r], [r for r in rows if "val/adherence" in r]
    if not val:
        return {}
    best = min(val, key=lambda r: r["val/loss"])
    last = {k: v for k, v in val[-1].items() if k in ("val/loss", "val/loss_mse", "val/loss_vlb")}
    found = {"step": val[-1]["step"], **last, "best_val_loss": best["val/loss"], "best_step": best["step"]}
    if metrics:
        found["adherence"] = metrics[-1]["val/adherence"]
    return found


def run_demo(out: str | Path, fast: bool = False, vae: str | Path | None = None) -> dict:
    """Everything, end to end; returns (and writes) the report."""
    from tristage.demo.adherence import adherence_report
    from tristage.train.inference.export import export

    started, out, scale = time.time(), Path(out), FAST if fast else FULL
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with StopSignals() as stop:
        data = write_world(out / "data", scale)
        write_demo_text_encoder(out / "encoders")
        summaries = []
        for n in (1, 2, 3):
            summary = None if stop.requested() else run_stage(stage_config(n, out, data, scale, vae), stop)
            if summary is None:
                return stopped(f"stage {n}", stop)
            summaries.append(summary)
        exports = {
            1: export(out / "stage1", out / "stage1" / "export"),
            3: export(out / "stage3", out / "export"),
        }
        if stop.requested():
            return stopped("the exports", stop)
    for n, folder in exports.items():
        summaries[n - 1]["export"] = str(folder)  # the trainer's summary predates the export
    report = adherence_report(out, scale.samples_per_prompt)
    report["exports"] = {f"stage{n}": str(folder) for n, folder in exports.items()}
    report["loss_fell"] = {f"stage{n}": loss_fell(out / f"stage{n}") for n in (1, 2, 3)}
    report["online_evaluation"] = {f"stage{n}": online_evaluation(out / f"stage{n}") for n in (1, 2, 3)}
    report["stages"] = summaries
    report["wall_s"] = round(time.time() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the budget is CPU: wall time hides a loaded machine
    report["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print_report(report)
    return report


def stopped(during: str, stop: StopSignals) -> dict:
    """A stop ends the demo cleanly: one line, exit 0 (130 after Ctrl-C); a rerun resumes from the saved
    checkpoints and complete cache units."""
    print(f"stopped during {during}; rerun to continue", flush=True)
    return {"stopped": during, "exit_status": stop.exit_status()}


def rates_line(rates: dict) -> str:
    """``single 97.2%  shape 95.8% ...`` for the properties a report measured."""
    from tristage.demo.adherence import PROPERTIES

    return "  ".join(f"{p} {rates[p]:.1%}" for p in PROPERTIES if p in rates)


def print_report(report: dict) -> None:
    lines = [
        "adherence report (demo/adherence.py: one connected shape of the asked kind, colour, ...)",
        f"  stage 1 (DiTPipeline, {report['stage1']['samples']} samples): {rates_line(report['stage1'])}",
        f"  stage 3 held-out prompts (PixArtAlphaPipeline, {report['held_out']['samples']} samples): "
        f"{rates_line(report['held_out'])}",
        f"  stage 3 seen prompts (the same with a trained background, {report['seen']['samples']} samples): "
        f"{rates_line(report['seen'])}",
    ]
    for prompt, rate in report["held_out"]["per_prompt"].items():
        lines.append(f"    {rate:6.1%}  {prompt}")
    lines.append(f"  loss fell: {report['loss_fell']}")
    for stage, found in report["online_evaluation"].items():
        adherence = f", adherence {found['adherence']:.1%}" if "adherence" in found else ""
        lines.append(
            f"  {stage} at step {found['step']}: val/loss {found['val/loss']:.4f} "
            f"(best {found['best_val_loss']:.4f} at step {found['best_step']}){adherence}"
        )
    lines.append(f"  wall time: {report['wall_s']} s, CPU time {report['cpu_s']} s")
    print("\n".join(lines), flush=True)
