"""The Checkpointer: the one object that owns everything a checkpoint holds.

It captures the model, its EMA, the optimizer, the LR scheduler, the loader's position, the NaN
guard's count and the train state (step, samples seen, tracker run id).  The Trainer calls
:meth:`Checkpointer.find` before accelerate's ``prepare`` (a resume makes ``init_from`` moot),
:meth:`~Checkpointer.load` after it, :meth:`~Checkpointer.save` at step boundaries and
:meth:`~Checkpointer.write_final` at the end.  The rules for files -- temp dir, fsync, rename,
``COMPLETE`` written last, rotation, "latest" -- live in ``checkpoint_files.py``.

A resume reads each file once per rank: :meth:`find` reads (and so verifies) the checkpoint it picks
and :meth:`load` restores from those same tensors.

``save`` is collective.  Every rank writes its own files, then the ranks agree on whether every write
worked (one all-reduce of a per-rank error code); only then does rank 0 commit, and a second one
tells every rank whether the commit worked.  A failure on any rank is a failure on all of them: they
all skip the save (``checkpoint.on_error: continue``) or all raise a one-line :class:`CheckpointError`
naming the failing ranks, and no rank is left waiting alone at a barrier.

Under ``train.parallelism: fsdp | fsdp_grad_op`` the weights, AdamW state and EMA go to a
torch.distributed.checkpoint folder instead (``dcp.py``): each rank writes its own shards, in a
second collective phase entered only once every rank's other files are written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from tristage.data.features import FeatureLoader
from tristage.data.fingerprint import tristage_version
from tristage.train.config import Config, save_config, to_yaml
from tristage.train.models import null_caption
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training import dcp
from tristage.train.training.ema import EMA
from tristage.train.training.nonfinite import DeviceGuard, SyncGuard
from tristage.train.training.validation import whole_ema_model

log = logging.getLogger(__name__)


@dataclass
class Saved:
    """The live objects a checkpoint captures (model and optimizer as accelerate prepared them)."""

    model: torch.nn.Module  # the wrapped model; its unwrapped module's weights are saved
    ema: EMA  # shadow weights (exported as final/)
    optimizer: torch.optim.Optimizer  # the raw AdamW (not accelerate's wrapper): moments and step counts
    scheduler: torch.optim.lr_scheduler.LRScheduler  # LR schedule position
    loader: FeatureLoader  # (epoch, next global batch)
    guard: SyncGuard | DeviceGuard  # consecutive non-finite steps


class Checkpointer:
    """Finds, loads and saves the full state of one stage run; writes its ``final/`` folder."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.root = Path(cfg.run.dir) / "checkpoints"
        self.state = ckpt.TrainState(version=tristage_version())
        self.saved: Saved | None = None
        self._found: tuple[Path, ckpt.Contents] | None = None
        self._last_saved = -1  # step of the checkpoint this process last committed or resumed from
        self.sharded = cfg.train.sharded  # DCP shards instead of whole files

    # -- resume ----------------------------------------------------------------------------------
    def find(self) -> Path | None:
        """The checkpoint to resume from per ``resume`` (read once and kept for :meth:`load`), or None."""
        if self.accelerator.is_main_process:
            ckpt.cleanup(self.root)  # temp folders of saves a crash cut short (no save is in flight yet)
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode in ("auto", "latest"):
            self._found = ckpt.newest_readable(self.root)
            if self._found is None and mode == "latest":
                raise ckpt.CheckpointError(f"{self.root}: resume=latest but no complete checkpoint exists")
        else:
            self._found = (Path(mode), ckpt.read(Path(mode)))
        return None if self._found is None else self._found[0]

    def load(self, saved: Saved) -> None:
        """Attach the live objects and, if :meth:`find` picked a checkpoint, restore all of them from it."""
        self.saved = saved
        if self._found is None:
            return
        (path, contents), self._found = self._found, None  # the tensors are not kept past the load
        self.state = contents.state
        model = self.accelerator.unwrap_model(saved.model)
        if contents.model is None:  # sharded: every rank reads its part, re-sharded to this layout
            dcp.load(path, model, saved.optimizer, saved.ema.state_dict())
        else:
            model.load_state_dict(contents.model)
            saved.ema.load_state_dict(contents.ema)
            saved.optimizer.load_state_dict(contents.optimizer)
        saved.scheduler.load_state_dict(self.state.scheduler)
        saved.loader.load_state_dict(self.state.loader)
        saved.guard.load(self.state.nonfinite_skips)
        ckpt.load_rank_rng(contents, self.accelerator.process_index)
        self._last_saved = self.state.step
        self._info(f"resumed from {path} at step {self.state.step}")

    # -- save ------------------------------------------------------------------------------------
    def save(self) -> bool:
        """Collective: checkpoint the current step on every rank.  True if it is on disk, complete.

        A write error leaves every earlier checkpoint untouched; ``checkpoint.on_error`` decides
        whether training goes on (False is returned) or every rank raises."""
        step = self.state.step
        if step == self._last_saved:
            return True
        final, tmp = ckpt.step_dir(self.root, step), ckpt.tmp_dir(self.root, step)
        self._capture()
        error = self._attempt(self._write_files, tmp)
        codes = self._agree(error)
        if not codes.any() and self.sharded:  # collective: only entered when every rank's files are written
            error = self._attempt(self._write_shards, tmp)
            codes = self._agree(error)
        if not codes.any():
            error = self._attempt(self._commit, tmp, final) if self.accelerator.is_main_process else None
            codes = self._agree(error)
        # End on a barrier (its work holds no Python tensor): a gloo worker thread still freeing the
        # tensor of the last all-reduce needs the GIL, and a rank that tears its process group down
        # then (holding the GIL, joining that thread) would hang forever at exit.
        self.accelerator.wait_for_everyone()
        if not codes.any():
            self._last_saved = step
            return True
        return self._failed(step, tmp, codes, error)

    def _capture(self) -> None:
        """Counters of the live objects into the train state (every rank; they agree)."""
        self.state.scheduler = self.saved.scheduler.state_dict()
        self.state.loader = self.saved.loader.state_dict()
        self.state.nonfinite_skips = self.saved.guard.count()

    def _write_files(self, tmp: Path) -> None:
        """Every rank its RNG state; rank 0 the weights, EMA, optimizer, counters and config."""
        tmp.mkdir(parents=True, exist_ok=True)
        ckpt.write_rank_files(tmp, self.accelerator.process_index)
        if self.accelerator.is_main_process and self.sharded:
            ckpt.write_state_files(tmp, self.state, to_yaml(self.cfg))
        elif self.accelerator.is_main_process:
            saved = self.saved
            model_sd = self.accelerator.get_state_dict(saved.model)
            optim_sd = saved.optimizer.state_dict()
            ckpt.write_main_files(
                tmp, model_sd, saved.ema.state_dict(), optim_sd, self.state, to_yaml(self.cfg)
            )

    def _write_shards(self, tmp: Path) -> None:
        """Every rank its shards of weights, AdamW state and EMA (``sharded/``; no rank gathers them)."""
        model = self.accelerator.unwrap_model(self.saved.model)
        dcp.save(tmp, model, self.saved.optimizer, self.saved.ema.state_dict())

    def _commit(self, tmp: Path, final: Path) -> None:
        ckpt.commit(tmp, final)
        ckpt.rotate(self.root, self.cfg.checkpoint.keep_last)

    def _attempt(self, write, *args) -> Exception | None:
        """Run this rank's part of a save; whatever goes wrong, every rank must reach the agreement."""
        try:
            write(*args)
        except Exception as err:
            return err
        return None

    def _agree(self, error: Exception | None) -> torch.Tensor:
        """Every rank's error code, 0 none, 1 I/O, 2 other (one all-reduce, also the phases' barrier)."""
        codes = torch.zeros(self.accelerator.num_processes, dtype=torch.int32, device=self.accelerator.device)
        codes[self.accelerator.process_index] = 0 if error is None else 1 if isinstance(error, OSError) else 2
        return self.accelerator.reduce(codes, reduction="sum").cpu()

    def _failed(self, step: int, tmp: Path, codes: torch.Tensor, error: Exception | None) -> bool:
        """The same decision on every rank: skip this save, or raise (always, for a non-I/O error)."""
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        ranks = ", ".join(str(r) for r in codes.nonzero().flatten().tolist())
        own = f" (here: {type(error).__name__}: {error})" if error is not None else ""
        message = f"checkpoint at step {step} failed on rank {ranks}{own}; earlier checkpoints are intact"
        if self.cfg.checkpoint.on_error != "continue" or bool((codes > 1).any()):
            raise ckpt.CheckpointError(message)
        if error is not None or self.accelerator.is_main_process:
            log.warning(message + "; continuing (checkpoint.on_error=continue)")
        return False

    # -- the stage's output ------------------------------------------------------------------------
    def write_final(self) -> None:
        """``final/``: EMA weights as a diffusers model folder plus the resolved config (collective).

        Sharded: only the EMA is gathered, tensor by tensor, onto rank 0's CPU (never the optimizer)."""
        final, main = Path(self.cfg.run.dir) / "final", self.accelerator.is_main_process
        model = self.accelerator.unwrap_model(self.saved.model)
        with whole_ema_model(model, self.saved.ema, main, torch.device("cpu")) as whole:
            if main:
                whole.save_pretrained(final / "transformer", safe_serialization=True)
                if self.saved.loader.null_buffer is not None:  # data.null_caption: buffer travels along
                    null_caption.save_buffer(self.saved.loader.null_buffer, final)
                save_config(self.cfg, final / "config.yaml")
                (final / ckpt.MARKER).write_text("ok\n")
        self.accelerator.wait_for_everyone()

    def _info(self, message: str) -> None:
        if self.accelerator.is_main_process:
            log.warning(message)
