"""The Trainer: one stage run, built from its config through accelerate.

``Trainer.train()`` reads as the outline of a run: restore (resume or the
weights-only ``init_from``), loop over steps, save, finish.  The loss is never
computed here -- the trainer calls ``Objective.loss``.  What is saved, and how, is the
``Checkpointer``'s (``checkpointer.py``); why and when a run stops early, ``Stops``' (``stops.py``):
every stop is agreed by all ranks at a step boundary.

One optimizer step is ``train.grad_accum`` micro-batches of ``data.batch_size`` on every process;
the global batch ``batch_size x processes x grad_accum`` is what the lr scaling, the loader's
stream and position, ``samples_seen``, img/s and the checkpoints count in.

Speed (see docs/scaling.md, "Speed options"): the model is built with the configured attention backend,
activation checkpointing of the first ``model.checkpoint_blocks`` blocks and, with ``train.compile``,
one ``torch.compile`` per block; AdamW is fused on CUDA and foreach elsewhere; the EMA is foreach.
Host syncs: metrics stay on the device between log steps (``Window``).  The NaN guard
(``train/nonfinite.py``) either reads its flag on the host every step (``train.nonfinite_check:
step``, the default: the skip and the stop happen on the bad step itself) or not at all
(``log``: fused AdamW and the EMA skip the update on the device from the flag; the consecutive-skip
count is read on log steps, so the stop comes at the next log step).  Both leave the weights, AdamW
state and EMA of a bad step bit-identical; the default keeps the sync because on one GPU it costs a
queue bubble per step, while ``log`` removes it for small, fast steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from tristage.data.features import CacheError, FeatureLoader, LoaderSpec, sample_latents
from tristage.data.fingerprint import tristage_version
from tristage.data.repa_features import WIDTH as REPA_WIDTH
from tristage.train.config import Config, save_config
from tristage.train.conversion.init_from import load_initial_weights
from tristage.train.diffusion import repa
from tristage.train.diffusion.objective import Objective
from tristage.train.families import family_of
from tristage.train.models import masking, null_caption
from tristage.train.models.sizes import size_of
from tristage.train.models.speed import build_for_training
from tristage.train.training import evaluation, fsdp, resume_checks, runlock, tracking, validation
from tristage.train.training.checkpoint_files import TrainState
from tristage.train.training.checkpointer import Checkpointer, Saved
from tristage.train.training.ema import EMA
from tristage.train.training.lr_schedules import lr_lambda
from tristage.train.training.metrics import Window
from tristage.train.training.nonfinite import GUARDS, Report
from tristage.train.training.remote_run import RunMirror
from tristage.train.training.stage_cache import expected_fingerprint
from tristage.train.training.stops import NONFINITE, Stops

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model, EMA, optimizer, loader and tracker of one stage run."""

    def __init__(self, cfg: Config):
        cfg, self.mirror = RunMirror.localised(cfg)  # run.dir on s3:// / gs://: a local folder mirrored
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        mode = tracking.mode_of(cfg)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with=mode.log_with, project_dir=cfg.run.dir
        )
        set_seed(cfg.train.seed)
        set_tf32(cfg.train.allow_tf32)
        self.objective = Objective(cfg.objective)
        self.family = family_of(cfg.model.family)
        self.loader = self._loader()  # before the model: the REPA projector's width is in its manifest
        self.model = self._build_model()
        self.guard = GUARDS[cfg.train.nonfinite_check](self.accelerator.device)
        self.sharded = False  # train.parallelism fsdp*: the model's parameters are DTensor shards
        self.adamw = self.optimizer = self.scheduler = None  # AdamW and its schedule: built once, in _prepare
        self.state = TrainState(version=tristage_version())  # step, samples seen (saved by the Checkpointer)
        self.checkpointer = Checkpointer(cfg, self.accelerator, self.mirror)  # saves and restores everything
        self.ema: EMA | None = None
        self.stops = Stops(self.accelerator, cfg.train.max_time)  # stop reasons every rank agrees on
        self._raw: tuple = (None, None)  # (wrapped model, unwrapped model), see _unwrapped
        self.validator = validation.Validator(cfg)  # rank 0 sample grids (train/validation.py)
        # val/loss and sample metrics on every rank (evaluation.py): a missing split or extractor fails here
        self.evaluator = evaluation.Evaluator(
            cfg, self.accelerator, self.objective, self.family, lambda: self.validator.null_buffer
        )

    def _build_model(self) -> torch.nn.Module:
        """The family's model with the configured attention, checkpointing and compilation, its REPA
        projector and tap (``objective.repa``) and its token-masking hooks (``train.mask``)."""
        out_channels = self.cfg.model.in_channels * (2 if self.cfg.objective.learn_sigma else 1)
        model = build_for_training(self.family.build, self.cfg.model, out_channels, self.cfg.train.compile)
        self.tap = repa.attach(model, self.cfg.objective.repa, self.loader.manifest.get(REPA_WIDTH))
        masking.install(model, self.cfg.train.mask, self.family.token_head)  # hooks: the model holds them
        return model

    def _optimizer(self) -> None:
        """AdamW over the model's parameters as they train (whole, or FSDP's shards) and its LR schedule."""
        self.adamw = self._adamw()
        self.optimizer = self.adamw  # accelerate's wrapper after prepare; self.adamw stays the raw AdamW
        optim = self.cfg.optim
        schedule = lr_lambda(optim.lr_schedule, optim.warmup_steps, self.cfg.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _adamw(self) -> torch.optim.AdamW:
        """AdamW, fused (one kernel per step) on CUDA and where the NaN guard needs ``found_inf``."""
        fused = self.accelerator.device.type == "cuda" or self.guard.fused_optimizer
        optim = self.cfg.optim
        return torch.optim.AdamW(
            self.model.parameters(),
            lr=self._lr(),
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=fused,
            foreach=not fused,
        )

    def _lr(self) -> float:
        """PixArt's auto_lr: sqrt-scale by global batch / 256."""
        lr = self.cfg.optim.lr
        if self.cfg.optim.auto_lr:
            lr *= math.sqrt(self.global_batch / 256)
        return lr

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: batch_size x processes x grad_accum micro-batches (the loader's)."""
        return self.loader.spec.global_batch

    def _loader(self) -> FeatureLoader:
        spec = LoaderSpec(
            batch_size=self.cfg.data.batch_size,
            grad_accum=self.cfg.train.grad_accum,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
            seed=self.cfg.train.seed,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            cond_dropout=self.cfg.data.cond_dropout,
            null_label=self.cfg.model.num_classes,
            pin_memory=self.accelerator.device.type == "cuda",
            on_damaged=self.cfg.data.on_damaged,
        )
        # data: the cache is checked against the raw source (units missing, changed, removed) before step 1
        expected = expected_fingerprint(self.cfg)
        return FeatureLoader(self.cfg.data.cache_dir, spec, expected=expected, data=self.cfg.data)

    # -- the run -------------------------------------------------------------------
    def train(self) -> dict:
        """Own the run dir and the stop signals for the whole run (released however it ends); run it."""
        with runlock.owning(self.accelerator, self.cfg.run.dir, self.cfg.run.lock_timeout):
            self.stops.install_handlers()
            try:
                return self._run()
            finally:
                self.stops.restore_handlers()

    def _run(self) -> dict:
        """Restore, loop until max_steps or a stop every rank agrees on, save, finish."""
        self._restore()
        self._start_tracking()
        self.stops.start_clock()  # after every rank's start-up: train.max_time counts from here
        first_step, batches, window = self.state.step, iter(self.loader), self._window()
        stop = None
        with self._progress() as bar:  # closed (its line ended) however the loop ends
            while self.state.step < self.cfg.train.max_steps and stop is None:
                window.add(self._step(batches, window), self.global_batch)
                self.state.step += 1
                self.state.samples += self.global_batch
                bar.update(1)
                self._maybe_log(window)
                self.validator.maybe_run(self.state.step, self.accelerator, self._unwrapped(), self.ema)
                self._evaluate()
                stop = self.stops.agreed()
                self._maybe_checkpoint(stop is not None)
        self.checkpointer.save()
        if stop == NONFINITE:
            reason = self.stops.nonfinite or "train.max_nonfinite reached on another rank"
            raise FloatingPointError(f"{reason}; state saved in {self.checkpointer.root}")
        finished = self.state.step >= self.cfg.train.max_steps
        summary = self._summary(first_step, window, finished, stop)
        if finished:
            self.checkpointer.write_final()
        self._release_wrappers()
        self.accelerator.end_training()
        return summary

    def _release_wrappers(self) -> None:
        """Free the DDP wrapper on every rank while all are alive.  Its Reducer holds the process group
        past ``end_training``; freed later, after a peer has exited, gloo's destructor can block forever
        (seen on 2 CPU ranks: one rank exited, the other hung in ``~ProcessGroupGloo``)."""
        self.accelerator.wait_for_everyone()
        self.model = self._unwrapped()  # the trained module stays (FSDP: it is the sharded module itself)
        self.optimizer = self.checkpointer.saved = None
        self._raw = (None, None)
        self.accelerator.free_memory()

    def _restore(self) -> None:
        """Resume full state if a checkpoint applies, else load init_from weights (handoff), then prepare."""
        resume = self.checkpointer.find()
        source_null = None
        if resume is None and self.cfg.init_from is not None:
            with repa.without_projector(self.model):  # the handoff carries no projector: it starts afresh
                source_null = load_initial_weights(self.model, self.cfg)  # before it is wrapped or sharded
        elif self.cfg.init_from is not None:
            self._info(f"resuming from {resume}; init_from={self.cfg.init_from} is ignored")
        self._set_null_caption(source_null)  # a resumed run reads the buffer it keeps in run.dir
        self._prepare()
        with repa.without_projector(self._unwrapped()) as plain:  # the EMA is what final/ exports
            self.ema = EMA(plain, self.cfg.train.ema_decay, self.cfg.train.ema_warmup)
        # The raw AdamW: its state dict is what DCP's get_state_dict maps to parameter names.
        parts = Saved(self.model, self.ema, self.adamw, self.scheduler, self.loader, self.guard, self.state)
        self.checkpointer.load(parts)
        self._resumed_at_another_batch()

    def _resumed_at_another_batch(self) -> None:
        """A resume at another global batch: the lr ``optim.auto_lr`` gives it, and one warning line."""
        saved = self.checkpointer.saved_global_batch
        if saved is None or saved == self.global_batch:
            return
        lr = self._lr()
        resume_checks.set_lr(self.adamw, self.scheduler, lr)
        self._info(resume_checks.batch_change_line(saved, self.accelerator.num_processes, self.cfg, lr))

    def _set_null_caption(self, source: torch.Tensor | None) -> None:
        """``data.null_caption: buffer``: the run's fixed null caption for the loader and validation."""
        if self.cfg.data.null_caption != "buffer":
            return
        size = (self.cfg.encoders.max_tokens, self.cfg.model.caption_channels)
        buffer = null_caption.resolve_buffer(self.run_dir, source, *size, self.cfg.train.seed)
        self.loader.null_buffer = self.validator.null_buffer = buffer
        if self.accelerator.is_main_process:
            null_caption.save_buffer(buffer, self.run_dir)

    def _prepare(self) -> None:
        """DDP through accelerate, or FSDP: ``fully_shard`` the model and let accelerate wrap only the
        optimizer (docs/scaling.md, "Sharded training").  AdamW is built here, once, after the
        sharding, so it holds the parameters that train."""
        device, bf16 = self.accelerator.device, self.cfg.train.mixed_precision == "bf16"
        self.model.to(device)
        self.sharded = fsdp.shard(self.model, self.cfg.train.parallelism, device, bf16)
        self._optimizer()
        if self.sharded:
            self.optimizer = self.accelerator.prepare(self.adamw)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    # -- one step ------------------------------------------------------------------
    def _next_batch(self, batches, window: Window) -> dict:
        """The loader's next batch; the time spent waiting for it is the window's data wait."""
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - t0
        return batch

    def _step_batches(self, batches, window: Window) -> list[dict]:
        """This step's grad_accum micro-batches, all read before any forward, so that a damaged cached
        sample on any one rank stops every rank before the update (Stops.agree_batches_ok)."""
        got, error = [], None
        try:
            for _ in range(self.cfg.train.grad_accum):
                got.append(self._next_batch(batches, window))
        except CacheError as err:
            error = err
        self.stops.agree_batches_ok(error)
        return got

    def _step(self, batches, window: Window) -> dict:
        """grad_accum micro-batches, NaN guard, clip, AdamW, EMA.

        The gradient all-reduce (DDP) or reduce-scatter (FSDP) runs on the last micro-batch only; each
        micro-batch's loss is scaled by 1 / grad_accum, so the gradient is the global batch's mean."""
        micro = self.cfg.train.grad_accum
        parts = []
        for i, batch in enumerate(self._step_batches(batches, window)):
            with self._gradient_sync(i == micro - 1):
                parts.append(self._forward_backward(batch, 1.0 / micro))
        metrics = merge_micro_metrics(parts)
        grad_norm = self._clip_grad_norm()
        finite = torch.isfinite(metrics["loss"]) & torch.isfinite(grad_norm)  # on the device
        self.guard.apply(finite, self._update)
        self._check_nonfinite(self.guard.poll(log_step=False))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update(grad_norm=grad_norm.detach())
        return metrics

    def _gradient_sync(self, sync: bool):
        """The context of one micro-batch's backward: with or without the gradient collective."""
        if self.sharded:  # FSDP2: a flag on the root module, not a context
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def _forward_backward(self, batch: dict, scale: float) -> dict:
        """One micro-batch through the objective; backward of ``scale`` x its mean loss."""
        device = self.accelerator.device
        batch = {k: to_device(v, device) for k, v in batch.items()}
        latents, noise = sample_latents(batch, device)
        inputs = {"latents": latents, "cond": self.family.inputs(batch), "repa": batch.get("repa")}
        timesteps = self.objective.timesteps_from_uniform(batch["u"]).to(device)
        kept = self._kept(batch, latents)
        with self.accelerator.autocast():
            loss, metrics = self.objective.loss(
                self.model, inputs, noise=noise, timesteps=timesteps, kept=kept, tap=self.tap
            )
        self.accelerator.backward(loss * scale if scale != 1.0 else loss)
        metrics.update(loss=loss.detach())
        return metrics

    def _kept(self, batch: dict, latents: torch.Tensor) -> masking.KeptTokens | None:
        """This step's kept tokens under ``train.mask`` (None: unmasked, off or past ``until_step``)."""
        mask = self.cfg.train.mask
        if mask is None or not mask.active(self.state.step):
            return None
        patch = size_of(self.cfg.model.size).patch_size
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        return masking.draw_kept(batch["noise_draw"], grid, patch, mask.ratio, latents.device)

    def _clip_grad_norm(self) -> torch.Tensor:
        """Clip to ``optim.grad_clip`` (None: no clipping, as DiT) and return the global norm."""
        params, clip = list(self.model.parameters()), self.cfg.optim.grad_clip
        clip = math.inf if clip is None else clip
        if self.sharded:
            return fsdp.clip_grad_norm(params, clip)
        return self.accelerator.clip_grad_norm_(params, clip)

    def _update(self, gate: torch.Tensor | None) -> None:
        """AdamW, then EMA.  A device ``gate`` (1 apply, 0 skip) reaches fused AdamW as ``found_inf``."""
        if gate is not None:
            self.adamw.found_inf = 1.0 - gate  # read by torch's fused AdamW, as GradScaler sets it
        self.optimizer.step()
        self.ema.update(self._unwrapped(), self.state.step, gate)

    def _check_nonfinite(self, report: Report | None) -> None:
        """Log skipped updates; after ``train.max_nonfinite`` consecutive ones, ask every rank to stop."""
        if report is None or report.skipped == 0:
            return
        self.state.nonfinite_skips = report.consecutive
        if self.accelerator.is_main_process:
            step, skipped = self.state.step, report.skipped
            log.warning("step %d: %d non-finite loss or gradient, update skipped", step, skipped)
        if report.worst >= self.cfg.train.max_nonfinite:
            self.stops.nonfinite = f"{report.worst} consecutive non-finite steps (train.max_nonfinite)"

    # -- side effects ----------------------------------------------------------------
    def _maybe_log(self, window: Window) -> None:
        if self.state.step % self.cfg.train.log_every and self.state.step != self.cfg.train.max_steps:
            return
        sum_over_processes = partial(self.accelerator.reduce, reduction="sum")
        values = window.flush(self.scheduler.get_last_lr()[0], self.state.samples, sum_over_processes)
        if self.metrics_file.is_new(self.state.step):  # a replayed step is already in the tracker
            tracking.log(self.accelerator, values, self.state.step)
        self.metrics_file.write(self.state.step, values)
        self._check_nonfinite(self.guard.poll(log_step=True))

    def _evaluate(self) -> None:
        """``val/*`` when due: to the trackers and metrics.jsonl; a new best ``val/loss`` is recorded in
        the train state and, with ``checkpoint.keep_best``, its checkpoint kept (every rank sees the same
        value, so every rank takes the same branch)."""
        values = self.evaluator.maybe_run(self.state.step, self._unwrapped(), self.ema)
        if values is None:
            return
        if self.metrics_file.is_new(self.state.step):
            tracking.log(self.accelerator, values, self.state.step)
        self.metrics_file.write(self.state.step, values)
        if evaluation.record_best(self.state, self.state.step, values) and self.cfg.checkpoint.keep_best:
            self.checkpointer.save_best()

    def _maybe_checkpoint(self, stopping: bool) -> None:
        if stopping or self.state.step % self.cfg.checkpoint.every == 0:
            self.checkpointer.save()

    def _start_tracking(self) -> None:
        self.metrics_file = tracking.MetricsFile(self.cfg.run.dir, self.accelerator.is_main_process)
        self.metrics_file.resume(self.state.step)
        if self.state.tracker_run_id is None:
            self.state.tracker_run_id = tracking.new_run_id()
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        config = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        tracking.start(self.accelerator, self.cfg, self.state.tracker_run_id, config)

    def _summary(self, first_step: int, window: Window, finished: bool, stop: str | None) -> dict:
        elapsed = self.stops.elapsed()
        steps = self.state.step - first_step
        summary = {
            "stage": self.cfg.run.name,
            "steps": self.state.step,
            "finished": finished,
            "stopped_by": stop_reason(stop, self.stops.signum),
            "exit_status": self.stops.exit_status(),  # tristage train's: 130 after Ctrl-C, else 0
            "wall_s": round(elapsed, 1),
            "img_per_s": round(steps * self.global_batch / max(elapsed, 1e-9), 2),
            "final_loss": window.last_loss,
            "final": str(self.run_dir / "final") if finished else None,
            "dropped_in_buckets": dict(self.loader.dropped),
            "damaged_skipped": self.loader.damaged_skipped,  # this rank's, with data.on_damaged=skip
            "export": self._export_path(),
            **evaluation.best_record(self.state),
        }
        self._info("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return summary

    def _export_path(self) -> str:
        """The pipeline folder next to the run, if one was exported (the trainer writes only final/)."""
        export = self.run_dir / "export"
        if (export / "model_index.json").is_file():
            return str(export)
        return "none (tristage export RUN_DIR OUT)"

    def _window(self) -> Window:
        processes = self.accelerator.num_processes
        return Window(self.accelerator.device, self.cfg.objective.num_timesteps, processes)

    def _progress(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.cfg.train.max_steps,
            initial=self.state.step,
            desc=self.cfg.run.name,
            disable=not self.accelerator.is_main_process,
            unit="step",
        )

    def _unwrapped(self):
        """The module under accelerate's wrappers, looked up once per wrapping (it is used every step)."""
        if self._raw[0] is not self.model:
            self._raw = (self.model, self.accelerator.unwrap_model(self.model))
        return self._raw[1]

    def _info(self, message: str) -> None:
        if self.accelerator.is_main_process:
            log.info(message)


def stop_reason(stop: str | None, signum: int) -> str | None:
    """``stop request (SIGINT)`` names the signal; other reasons stay as they are."""
    if stop == "stop request" and signum:
        return f"{stop} ({signal.Signals(signum).name})"
    return stop


def set_tf32(allow: bool) -> None:
    """TF32 tensor-core matmuls and convolutions on CUDA (fp32 range, ~10-bit mantissa)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def merge_micro_metrics(parts: list[dict]) -> dict:
    """One step's metrics from its micro-batches': means of the scalars, per-sample values joined."""
    if len(parts) == 1:
        return parts[0]
    joined = {k: [p[k] for p in parts] for k in parts[0]}
    return {k: torch.stack(v).mean() if v[0].dim() == 0 else torch.cat(v) for k, v in joined.items()}


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


def run_train(cfg: Config) -> dict:
    """Entry point used by the CLI."""
    return Trainer(cfg).train()


__all__ = ["Trainer", "run_train"]
