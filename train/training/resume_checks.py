"""What a resume checks before it continues: the model it resumes, and the global batch it runs at.

- **The model.**  A checkpoint's ``config.yaml`` holds the model it was saved with.  Before any weight is
  loaded, its ``model.*`` keys (and ``objective.learn_sigma``, which sets the output channels) are
  compared with the current config; a difference is one line naming each key with both values,
  pointing to ``init_from`` for an intentional change of architecture (loading weights into a new
  shape is a stage handoff, not a resume).  Keys that only change how the same weights are computed or
  were first drawn (attention backend, activation checkpointing, init scales) may change.
- **The global batch** (processes x ``data.batch_size`` x ``train.grad_accum``).  A resume at another
  global batch -- 2 processes x 4 saved, 1 x 4 now -- goes on, with one warning line giving the old and
  new global batch and the lr now used: ``optim.auto_lr`` scales it by the new global batch (the AdamW
  state in the checkpoint carries the old lr, which would otherwise stay).  The data position stays
  exact (``data/features.py``, ``FeatureLoader.load_state_dict``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tristage.errors import CheckpointError
from tristage.train.config import Config

# model.* keys that may differ between a checkpoint and its resume: the same weights, computed another way
# or first drawn another way.  Every other model key (and any added later) is part of the architecture.
RUNTIME_ONLY = (
    "gradient_checkpointing",
    "checkpoint_blocks",
    "attention_backend",
    "class_embed_std",
    "caption_embed_std",
)


def architecture(model: dict, objective: dict) -> dict[str, object]:
    """The config keys that fix the shape and meaning of the weights, by dotted name."""
    keys = {f"model.{k}": v for k, v in model.items() if k not in RUNTIME_ONLY}
    return {**keys, "objective.learn_sigma": objective.get("learn_sigma")}


def check_model(checkpoint: Path, cfg: Config) -> None:
    """One line if ``checkpoint`` was saved with another architecture than ``cfg``'s (nothing changes)."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml"))
    except (OSError, ValueError) as err:  # not readable: the weights' own check stays (load_state_dict)
        raise CheckpointError(f"{checkpoint / 'config.yaml'}: unreadable ({type(err).__name__})") from None
    then = architecture(saved.get("model", {}), saved.get("objective", {}))
    now = architecture(asdict(cfg.model), asdict(cfg.objective))
    changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now if then.get(k, now[k]) != now[k]]
    if changed:
        raise CheckpointError(
            f"{checkpoint} was saved with another model ({', '.join(changed)}: checkpoint -> config); "
            "to resume it, set those keys back; to start a new architecture from its weights, use "
            "init_from in a new run.dir"
        )


def set_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make ``lr`` the schedule's base, and the current lr its value at the current step."""
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * schedule(scheduler.last_epoch)
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def saved_global_batch(loader_state: dict, step: int, samples: int) -> int | None:
    """The global batch a checkpoint ran at: its loader's record, else (older checkpoints) samples/step."""
    if "global_batch" in loader_state:
        return int(loader_state["global_batch"])
    return samples // step if step else None


def batch_change_line(saved: int, processes: int, cfg: Config, lr: float) -> str:
    """The one warning line of a resume at another global batch."""
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum
    how = (
        "optim.auto_lr: optim.lr x sqrt(global batch / 256)" if cfg.optim.auto_lr else "optim.auto_lr is off"
    )
    return (
        f"resuming at global batch {processes * batch * accum} ({processes} processes x data.batch_size "
        f"{batch} x train.grad_accum {accum}); the checkpoint ran at global batch {saved}: lr now {lr:.4g} "
        f"({how}); the data position is kept"
    )
