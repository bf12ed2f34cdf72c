"""Experiment tracking through accelerate's trackers (W&B offline by default), rank 0 only.

``tracking.mode``: ``offline`` (W&B writes a local run directory, no network),
``online``, ``tensorboard`` or ``disabled``.  The W&B run id is created once and
stored in every checkpoint, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from tristage.files import atomic_write
from tristage.train.config import Config


@dataclass(frozen=True)
class Mode:
    """How one tracking mode maps onto accelerate."""

    log_with: str | None  # accelerate tracker name
    wandb_mode: str | None  # W&B mode


# tracking.mode (its choices: train/config.py TRACKING_MODES) -> how accelerate tracks
MODES: dict[str, Mode] = {
    "offline": Mode("wandb", "offline"),
    "online": Mode("wandb", "online"),
    "tensorboard": Mode("tensorboard", None),
    "disabled": Mode(None, None),
}


def mode_of(cfg: Config) -> Mode:
    return MODES[cfg.tracking.mode]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def start(accelerator, cfg: Config, run_id: str, config_dict: dict) -> None:
    """Initialise the tracker on rank 0 (accelerate makes the call a no-op elsewhere)."""
    mode = mode_of(cfg)
    if mode.log_with is None:
        return
    init_kwargs = {}
    if mode.wandb_mode is not None:
        os.environ.setdefault("WANDB_SILENT", "true")
        init_kwargs["wandb"] = {
            "mode": mode.wandb_mode,
            "dir": cfg.run.dir,
            "id": run_id,
            "resume": "allow",
            "name": cfg.tracking.run_name or cfg.run.name,
            "tags": list(cfg.tracking.tags),
        }
    else:  # TensorBoard's hparams take flat scalars only
        config_dict = flat_config(config_dict)
    accelerator.init_trackers(cfg.tracking.project, config=config_dict, init_kwargs=init_kwargs)
    if mode.wandb_mode is not None and accelerator.is_main_process:
        # Charts use "train/step" as x axis, not W&B's own step counter: after a resume the steps
        # between the last checkpoint and the kill are logged again, and W&B drops points whose
        # own step goes backwards (https://docs.wandb.ai/guides/track/log/customize-logging-axes).
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")


def flat_config(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and None as strings."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def log(accelerator, values: dict, step: int) -> None:
    """Metrics of ``step`` to every tracker (accelerate: rank 0 only).

    W&B gets ``train/step`` as a value and keeps its own monotone counter; TensorBoard takes the step."""
    values = {**values, "train/step": step}
    for tracker in accelerator.trackers:
        tracker.log(values, step=None if tracker.name == "wandb" else step)


class MetricsFile:
    """``metrics.jsonl`` in the run directory (rank 0): the source of the loss-curve plots.

    A resumed run replays the steps between its checkpoint and the stop.  :meth:`resume` drops the
    file's rows past the checkpoint (they are written again) and remembers the last step logged
    before, so the tracker -- whose rows cannot be taken back -- skips the replayed steps
    (:meth:`is_new`); resume is exact, so it already holds their values."""

    def __init__(self, run_dir: str, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.logged_up_to = -1  # the last step the tracker got before this start

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step`` (the checkpoint resumed from; 0 for a fresh start)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [(line, _step_of(line)) for line in self.path.read_text().splitlines()]
        if step > 0:  # the same tracker run continues (its id is in the checkpoint)
            self.logged_up_to = max((s for _, s in rows if s is not None), default=-1)
        kept = [line + "\n" for line, s in rows if s is not None and s <= step]
        atomic_write(self.path, "".join(kept))

    def is_new(self, step: int) -> bool:
        return step > self.logged_up_to

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")


def _step_of(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` row; None for a row a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
