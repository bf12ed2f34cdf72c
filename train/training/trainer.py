"""The Trainer: one stage run, built from its config through accelerate.

``Trainer.train()`` reads as the outline of a run: restore (resume or the
weights-only ``init_from``), loop over steps, save, finish.  The loss is never
computed here -- the trainer calls ``Objective.loss``.

Speed (see README "Scale and speed"): the model is built with the configured attention backend,
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

import logging
import math
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from tristage.data.features import FeatureLoader, LoaderSpec, sample_latents
from tristage.data.fingerprint import fingerprint, tristage_version
from tristage.train.config import Config, check_train_options, save_config, to_yaml
from tristage.train.conversion.init_from import load_initial_weights
from tristage.train.diffusion.objective import Objective
from tristage.train.models.families import family_of
from tristage.train.models.speed import build_for_training
from tristage.train.training import checkpoint as ckpt
from tristage.train.training import null_caption, tracking, validation
from tristage.train.training.ema import EMA
from tristage.train.training.lr_schedules import lr_lambda
from tristage.train.training.nonfinite import GUARDS, Report

log = logging.getLogger(__name__)
TIMESTEP_BUCKETS = 4  # loss is also logged per quarter of the timestep range


class Trainer:
    """Owns the model, EMA, optimizer, loader and tracker of one stage run."""

    def __init__(self, cfg: Config):
        check_train_options(cfg, f"{cfg.run.name} config")
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
        self.model = self._build_model()
        self.guard = GUARDS[cfg.train.nonfinite_check](self.accelerator.device)
        self.adamw = self._adamw()
        self.optimizer = self.adamw  # accelerate's wrapper after prepare; self.adamw stays the raw AdamW
        schedule = lr_lambda(cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.loader = self._loader()
        self.state = ckpt.TrainState(version=tristage_version())
        self.ema: EMA | None = None
        self.stop_requested = False
        self._raw: tuple = (None, None)  # (wrapped model, unwrapped model), see _unwrapped
        self.validator = validation.Validator(cfg)  # rank 0 sample grids (train/validation.py)

    def _build_model(self) -> torch.nn.Module:
        """The family's model with the configured attention, checkpointing and compilation."""
        out_channels = self.cfg.model.in_channels * (2 if self.cfg.objective.learn_sigma else 1)
        return build_for_training(self.cfg.model, out_channels, self.cfg.train.compile)

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
        return self.cfg.data.batch_size * self.accelerator.num_processes

    def _loader(self) -> FeatureLoader:
        spec = LoaderSpec(
            global_batch=self.global_batch,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
            seed=self.cfg.train.seed,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            cond_dropout=self.cfg.data.cond_dropout,
            null_label=self.cfg.model.num_classes,
            pin_memory=self.accelerator.device.type == "cuda",
        )
        return FeatureLoader(self.cfg.data.cache_dir, spec, expected=fingerprint(self.cfg))

    # -- the run -------------------------------------------------------------------
    def train(self) -> dict:
        """Restore, loop until max_steps (or a stop request / time budget), save, finish."""
        self._restore()
        self._install_signal_handlers()
        self._start_tracking()
        started, first_step = time.time(), self.state.step
        batches = iter(self.loader)
        window = Window(
            self.accelerator.device, self.cfg.objective.num_timesteps, self.accelerator.num_processes
        )
        bar = self._progress()
        while self.state.step < self.cfg.train.max_steps and not self._should_stop(started):
            metrics = self._step(self._next_batch(batches, window))
            window.add(metrics, self.global_batch)
            self.state.step += 1
            self.state.samples += self.global_batch
            bar.update(1)
            self._maybe_log(window)
            self.validator.maybe_run(self.state.step, self.accelerator, self._unwrapped(), self.ema)
            self._maybe_checkpoint()
        bar.close()
        self._save_checkpoint()
        finished = self.state.step >= self.cfg.train.max_steps
        summary = self._summary(started, first_step, window, finished)
        if finished:
            self._write_final()
        self.accelerator.end_training()
        return summary

    def _restore(self) -> None:
        """Resume full state if a checkpoint applies, else load init_from weights (handoff)."""
        path = self._resume_path()
        if path is None:
            source_null = None
            if self.cfg.init_from is not None:
                source_null = load_initial_weights(self.model, self.cfg)
            self._set_null_caption(source_null)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            self.ema = EMA(self._unwrapped(), self.cfg.train.ema_decay, self.cfg.train.ema_warmup)
            return
        if self.cfg.init_from is not None:
            self._info(f"resuming from {path}; init_from={self.cfg.init_from} is ignored")
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.ema = EMA(self._unwrapped(), self.cfg.train.ema_decay, self.cfg.train.ema_warmup)
        self._load_checkpoint(path)
        self._set_null_caption(None)  # a resumed run reads the buffer it keeps in run.dir

    def _set_null_caption(self, source: torch.Tensor | None) -> None:
        """``data.null_caption: buffer``: the run's fixed null caption for the loader and validation."""
        if self.cfg.data.null_caption != "buffer":
            return
        size = (self.cfg.encoders.max_tokens, self.cfg.model.caption_channels)
        buffer = null_caption.resolve_buffer(self.run_dir, source, *size, self.cfg.train.seed)
        self.loader.null_buffer = self.validator.null_buffer = buffer
        if self.accelerator.is_main_process:
            null_caption.save_buffer(buffer, self.run_dir)

    def _resume_path(self) -> Path | None:
        mode = self.cfg.resume
        if mode == "none":
            return None
        root = self.run_dir / "checkpoints"
        if mode in ("auto", "latest"):
            found = ckpt.latest(root)
            if found is None and mode == "latest":
                raise ckpt.CheckpointError(f"{root}: resume=latest but no complete checkpoint exists")
            return found
        ckpt.verify(Path(mode))
        return Path(mode)

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.state = ckpt.verify(path)
        self._unwrapped().load_state_dict(load_file(path / "model.safetensors"))
        self.ema.load_state_dict(load_file(path / "ema.safetensors"))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(self.state.scheduler)
        self.loader.load_state_dict(self.state.loader)
        self.guard.load(self.state.nonfinite_skips)
        ckpt.load_rank_rng(path, self.accelerator.process_index)
        self._info(f"resumed from {path} at step {self.state.step}")

    # -- one step ------------------------------------------------------------------
    def _next_batch(self, batches, window: Window) -> dict:
        """The loader's next batch; the time spent waiting for it is the window's data wait."""
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - t0
        return batch

    def _step(self, batch: dict) -> dict:
        """Forward + backward through the objective, NaN guard, clip, AdamW, EMA."""
        device = self.accelerator.device
        batch = {k: to_device(v, device) for k, v in batch.items()}
        latents, noise = sample_latents(batch, device)
        cond = self.family.inputs(batch)
        timesteps = self.objective.timesteps_from_uniform(batch["u"]).to(device)
        with self.accelerator.autocast():
            loss, metrics = self.objective.loss(
                self.model,
                {"latents": latents, "cond": cond},
                noise=noise,
                timesteps=timesteps,
            )
        self.accelerator.backward(loss)
        clip = self.cfg.optim.grad_clip
        clip = math.inf if clip is None else clip  # None: no clipping (DiT); the norm is still logged
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)  # on the device
        self.guard.apply(finite, self._update)
        self._check_nonfinite(self.guard.poll(log_step=False))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update(loss=loss.detach(), grad_norm=grad_norm.detach())
        return metrics

    def _update(self, gate: torch.Tensor | None) -> None:
        """AdamW, then EMA.  A device ``gate`` (1 apply, 0 skip) reaches fused AdamW as ``found_inf``."""
        if gate is not None:
            self.adamw.found_inf = 1.0 - gate  # read by torch's fused AdamW, as GradScaler sets it
        self.optimizer.step()
        self.ema.update(self._unwrapped(), self.state.step, gate)

    def _check_nonfinite(self, report: Report | None) -> None:
        """Log skipped updates; after ``train.max_nonfinite`` consecutive ones, save and stop."""
        if report is None or report.skipped == 0:
            return
        self.state.nonfinite_skips = report.consecutive
        self._info(f"step {self.state.step}: {report.skipped} non-finite loss or gradient, update skipped")
        if report.worst >= self.cfg.train.max_nonfinite:
            self._save_checkpoint()
            raise FloatingPointError(
                f"{report.worst} consecutive non-finite steps (train.max_nonfinite); "
                f"state saved in {self.run_dir / 'checkpoints'}"
            )

    # -- side effects ----------------------------------------------------------------
    def _maybe_log(self, window: Window) -> None:
        if self.state.step % self.cfg.train.log_every and self.state.step != self.cfg.train.max_steps:
            return
        sum_over_processes = partial(self.accelerator.reduce, reduction="sum")
        values = window.flush(self.scheduler.get_last_lr()[0], self.state.samples, sum_over_processes)
        tracking.log(self.accelerator, values, self.state.step)
        self.metrics_file.write(self.state.step, values)
        self._check_nonfinite(self.guard.poll(log_step=True))

    def _maybe_checkpoint(self) -> None:
        if self.state.step % self.cfg.checkpoint.every == 0:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        """Assemble in a temp dir (every rank writes its RNG), rename, mark complete, rotate.

        A write error leaves every earlier checkpoint untouched; ``checkpoint.on_error`` decides
        whether training goes on."""
        root = self.run_dir / "checkpoints"
        final, tmp = ckpt.step_dir(root, self.state.step), root / f".tmp-step_{self.state.step:07d}"
        if (final / ckpt.MARKER).exists():
            return
        self.state.scheduler = self.scheduler.state_dict()
        self.state.loader = self.loader.state_dict()
        self.state.nonfinite_skips = self.guard.count()
        try:
            self._write_checkpoint(tmp, final, root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            message = f"checkpoint at step {self.state.step} failed ({err}); earlier checkpoints are intact"
            if self.cfg.checkpoint.on_error != "continue":
                raise ckpt.CheckpointError(message) from None
            self._info(message + "; continuing (checkpoint.on_error=continue)")

    def _write_checkpoint(self, tmp: Path, final: Path, root: Path) -> None:
        if self.accelerator.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        ckpt.write_rank_files(tmp, self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model_sd = self.accelerator.get_state_dict(self.model)
            optim_sd = self.optimizer.state_dict()
            ckpt.write_main_files(
                tmp, model_sd, self.ema.state_dict(), optim_sd, self.state, to_yaml(self.cfg)
            )
            ckpt.commit(tmp, final)
            ckpt.rotate(root, self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()

    def _write_final(self) -> None:
        """``final/``: EMA weights as a diffusers model folder plus the resolved config."""
        if not self.accelerator.is_main_process:
            return
        final = self.run_dir / "final"
        model = self._unwrapped()
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.ema.copy_to(model)
        model.save_pretrained(final / "transformer", safe_serialization=True)
        if self.loader.null_buffer is not None:
            null_caption.save_buffer(self.loader.null_buffer, final)
        model.load_state_dict(raw)
        save_config(self.cfg, final / "config.yaml")
        (final / ckpt.MARKER).write_text("ok\n")

    def _start_tracking(self) -> None:
        self.metrics_file = tracking.MetricsFile(self.cfg.run.dir, self.accelerator.is_main_process)
        if self.state.tracker_run_id is None:
            self.state.tracker_run_id = tracking.new_run_id()
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        config = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        tracking.start(self.accelerator, self.cfg, self.state.tracker_run_id, config)

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM pre-emption): finish the step, save, exit 0."""

        def request_stop(signum, _frame):
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _should_stop(self, started: float) -> bool:
        budget = self.cfg.train.max_time
        out_of_time = budget is not None and time.time() - started > budget
        return self.stop_requested or out_of_time

    def _summary(self, started: float, first_step: int, window: Window, finished: bool) -> dict:
        elapsed = time.time() - started
        steps = self.state.step - first_step
        summary = {
            "stage": self.cfg.run.name,
            "steps": self.state.step,
            "finished": finished,
            "wall_s": round(elapsed, 1),
            "img_per_s": round(steps * self.global_batch / max(elapsed, 1e-9), 2),
            "final_loss": window.last_loss,
            "final": str(self.run_dir / "final") if finished else None,
            "dropped_in_buckets": dict(self.loader.dropped),
            "export": self._export_path(),
        }
        self._info("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return summary

    def _export_path(self) -> str:
        """The pipeline folder next to the run, if one was exported (the trainer writes only final/)."""
        export = self.run_dir / "export"
        if (export / "model_index.json").is_file():
            return str(export)
        return "none (tristage export RUN_DIR OUT)"

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
            log.warning(message)


class Window:
    """Metric tensors summed on device between log steps (no host sync until flush)."""

    def __init__(self, device: torch.device, num_timesteps: int, processes: int = 1):
        self.device, self.num_timesteps, self.processes = device, num_timesteps, processes
        self.last_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.bucket_sum = torch.zeros(TIMESTEP_BUCKETS, device=self.device)
        self.bucket_n = torch.zeros(TIMESTEP_BUCKETS, device=self.device)
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()
        self.cpu0 = time.process_time()  # CPU seconds of all this process's threads
        self.data_wait = 0.0  # seconds spent waiting on the loader (Trainer._next_batch)

    def add(self, metrics: dict, batch: int) -> None:
        for key in ("loss", "loss_mse", "loss_vlb", "grad_norm"):
            value = metrics[key].float()
            self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value
        t = metrics["timesteps"].float()
        bucket = (t / self.num_timesteps * TIMESTEP_BUCKETS).long().clamp(0, TIMESTEP_BUCKETS - 1)
        self.bucket_sum.index_add_(0, bucket, metrics["per_sample_loss"].float())
        self.bucket_n.index_add_(0, bucket, torch.ones_like(t))
        self.steps += 1
        self.images += batch

    def flush(self, lr: float, samples: int, sum_over_processes=lambda t: t) -> dict[str, float]:
        """Window means over steps and over processes (one all-reduce), plus rates; then reset."""
        keys, buckets = list(self.sums), TIMESTEP_BUCKETS
        means = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1) if keys else self.bucket_n[:0]
        packed = sum_over_processes(torch.cat([means, self.bucket_sum, self.bucket_n]))
        values = dict(zip(keys, (packed[: len(keys)] / self.processes).tolist()))
        bucket_sum, bucket_n = packed[len(keys) : len(keys) + buckets], packed[len(keys) + buckets :]
        per_bucket = (bucket_sum / bucket_n.clamp(min=1)).tolist()
        values.update({f"loss_t{i}": v for i, v in enumerate(per_bucket)})
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        values.update(lr=lr, samples_seen=samples, img_per_s=self.images / elapsed)
        values.update(data_wait_share=self.data_wait / elapsed)
        values.update(cpu_util=(time.process_time() - self.cpu0) / elapsed)  # busy host cores, on average
        if self.device.type == "cuda":
            values.update(gpu_mem_gb=torch.cuda.max_memory_allocated(self.device) / 2**30)
        self.last_loss = values.get("loss")
        self._reset()
        return values


def set_tf32(allow: bool) -> None:
    """TF32 tensor-core matmuls and convolutions on CUDA (fp32 range, ~10-bit mantissa)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


def run_train(cfg: Config) -> dict:
    """Entry point used by the CLI."""
    return Trainer(cfg).train()


__all__ = ["Trainer", "run_train", "asdict"]
