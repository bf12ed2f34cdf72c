"""Online evaluation every rank shares: the fixed-timestep validation loss and the sample metrics.

**val/loss** (``validation.loss_every``) is MLPerf Training's text-to-image validation loss (Flux.1 on
torchtitan, https://github.com/mlcommons/training/tree/master/text_to_image) applied to this objective:
the EMA model's loss on the whole held-out split (``data/val_split.py``) at ``validation.loss_timesteps``
timesteps, the midpoints of equal bins of the training range (8: t = 62, 187, ..., 937 of 1000).  Every
(sample, timestep) pair is one item with its own fixed noise, drawn from a generator seeded by
(``validation.loss_seed``, sample key, timestep index); the latent is the cached posterior mean (no
sampling noise) and no condition is dropped.  The loss terms are the training ones (``Objective.loss``:
the weighted MSE, plus the VLB where sigma is learned), reported apart as ``val/loss_mse`` and
``val/loss_vlb``, and per timestep as ``val/loss_t{T}``.  ``val/loss`` is the mean over the timesteps.

Nothing in it depends on how the run is laid out: the items are cut into one contiguous share per
rank, every rank evaluates its share (DDP and FSDP alike; under FSDP each rank first gathers the EMA
into a whole plain copy, one all-gather per tensor, so no forward waits on a collective), and the
per-timestep sums are added over the ranks in float64 -- the same value, to fp32 reduction tolerance,
on any number of processes, at any batch size or gradient accumulation, and after a resume.

The sample metrics (``validation.metrics_every``) are ``sample_metrics.py``'s.  ``val/seconds`` is the
wall time of one evaluation (``val/cpu_seconds`` the CPU time of this process's threads).  The lowest
``val/loss`` and its step go into the train state (and so the checkpoints), the run's summary and
``final/training.json``; ``checkpoint.keep_best`` keeps its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import xxhash

from tristage.data.fingerprint import fingerprint
from tristage.data.val_split import ValSplit, has_split, split_data
from tristage.train.config import Config, ConfigError
from tristage.train.diffusion.objective import Objective, ObjectiveConfig
from tristage.train.families import Family, feature_encoders
from tristage.train.training.sample_metrics import SampleMetrics, share
from tristage.train.training.validation import whole_ema_model


def fixed_timesteps(objective: ObjectiveConfig, count: int) -> torch.Tensor:
    """(count,) timesteps at the midpoints of ``count`` equal bins of the training range [0, T), mapped
    as training maps its draws (``Objective.timesteps_from_uniform``) but without ``timestep_shift``, so
    runs that train with different shifts are measured at the same points."""
    u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return Objective(replace(objective, timestep_shift=1.0)).timesteps_from_uniform(u)


def item_seed(seed: int, key: str, k: int) -> int:
    """The noise seed of held-out sample ``key`` at timestep index ``k``: fixed, whoever evaluates it."""
    return xxhash.xxh3_64_intdigest(f"{seed}/{key}/{k}".encode()) & (2**63 - 1)


@dataclass(frozen=True)
class Item:
    """One (held-out sample, timestep) pair of the validation loss."""

    sample: int  # index into ValSplit.samples (ordered by bucket)
    k: int  # index into the fixed timesteps


class ValLoss:
    """The fixed-timestep validation loss of the EMA weights on this rank's share, summed over ranks."""

    def __init__(self, cfg: Config, accelerator, objective: Objective, family: Family):
        if not has_split(cfg.data):
            raise ConfigError(
                "key 'validation.loss_every': the validation loss needs a held-out split "
                "(data.val_fraction or data.val_paths, then `tristage cache`)"
            )
        self.cfg, self.accelerator, self.objective, self.family = cfg, accelerator, objective, family
        self.split = ValSplit(cfg.data, fingerprint(split_data(cfg.data), feature_encoders(cfg)))
        self.timesteps = fixed_timesteps(cfg.objective, cfg.validation.loss_timesteps)

    def batches(self) -> Iterator[list[Item]]:
        """This rank's items in batches of ``data.batch_size``, each of one timestep and one bucket."""
        count, n = len(self.timesteps), len(self.split)
        mine = share(count * n, self.accelerator.process_index, self.accelerator.num_processes)
        batch: list[Item] = []
        for index in mine:
            item = Item(index % n, index // n)  # timestep-major: a run of one timestep, by bucket
            if batch and (item.k != batch[0].k or self._bucket(item) != self._bucket(batch[0])):
                yield batch
                batch = []
            batch.append(item)
            if len(batch) == self.cfg.data.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _bucket(self, item: Item) -> tuple:
        return tuple(self.split.samples[item.sample].meta["bucket"])

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """``val/loss``, its MSE and VLB terms and one ``val/loss_t{T}`` per timestep (every rank)."""
        device = self.accelerator.device
        sums = torch.zeros(4, len(self.timesteps), dtype=torch.float64, device=device)  # loss, mse, vlb, n
        for items in self.batches():
            sums[:, items[0].k] += self._batch_sums(model, items)
        sums = self.accelerator.reduce(sums, reduction="sum")
        loss, mse, vlb = (sums[:3] / sums[3]).cpu()  # each (K,): means per timestep
        values = {"val/loss": loss.mean().item(), "val/loss_mse": mse.mean().item()}
        values["val/loss_vlb"] = vlb.mean().item()
        values.update({f"val/loss_t{int(t)}": v.item() for t, v in zip(self.timesteps, loss)})
        return values

    def _batch_sums(self, model: torch.nn.Module, items: list[Item]) -> torch.Tensor:
        """(4,) float64: this batch's summed loss, MSE and VLB, and its size."""
        device, k = self.accelerator.device, items[0].k
        rows = [self.split.samples[i.sample] for i in items]
        batch = {
            n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in self.split.batch(rows).items()
        }
        latents = batch["mean"].float() * self.split.scaling_factor  # (b, C, h, w): the posterior mean
        noise = torch.stack([self._noise(row.key, k, latents.shape[1:]) for row in rows])
        timesteps = self.timesteps[[k] * len(items)].to(device)
        inputs = {"latents": latents, "cond": self.family.inputs(batch)}
        with self.accelerator.autocast():
            _, metrics = self.objective.loss(model, inputs, noise=noise, timesteps=timesteps)
        n = len(items)
        terms = [metrics["per_sample_loss"].sum(), metrics["loss_mse"] * n, metrics["loss_vlb"] * n]
        return torch.stack(
            [t.double() for t in terms] + [torch.tensor(n, dtype=torch.float64, device=device)]
        )

    def _noise(self, key: str, k: int, shape: torch.Size) -> torch.Tensor:
        g = torch.Generator(self.accelerator.device).manual_seed(
            item_seed(self.cfg.validation.loss_seed, key, k)
        )
        return torch.randn(shape, generator=g, device=self.accelerator.device)


class Evaluator:
    """What the trainer calls after every step: the validation loss and the sample metrics, when due.

    Built at start-up, so a missing split, cache file or extractor is one line before the first step."""

    def __init__(
        self, cfg: Config, accelerator, objective: Objective, family: Family, null_buffer=lambda: None
    ):
        """``null_buffer``: returns the run's ``data.null_caption: buffer`` (None: T5("")), for CFG."""
        v = cfg.validation
        self.cfg, self.accelerator = cfg, accelerator
        try:
            self.loss = ValLoss(cfg, accelerator, objective, family) if v.loss_every else None
            self.metrics = SampleMetrics(cfg, accelerator, family, null_buffer) if v.metrics_every else None
        except ConfigError as err:  # named as check_train_options names the run's config
            raise ConfigError(f"{cfg.run.name} config: {err}") from None

    def due(self, step: int) -> tuple[bool, bool]:
        v = self.cfg.validation
        return bool(v.loss_every) and step % v.loss_every == 0, bool(
            v.metrics_every
        ) and step % v.metrics_every == 0

    def maybe_run(self, step: int, model: torch.nn.Module, ema) -> dict[str, float] | None:
        """The values of ``step``'s evaluation (every rank gets them), or None when none is due."""
        loss_due, metrics_due = self.due(step)
        if not (loss_due or metrics_due):
            return None
        start, cpu, values, device = time.perf_counter(), time.process_time(), {}, self.accelerator.device
        with whole_ema_model(model, ema, True, device) as evaluated:  # every rank: the EMA weights, whole
            if loss_due:
                values.update(self.loss.run(evaluated))
            if metrics_due:
                values.update(self.metrics.run(evaluated, step))
        values["val/seconds"] = time.perf_counter() - start
        values["val/cpu_seconds"] = (
            time.process_time() - cpu
        )  # this process's threads: the work on a CPU host
        return values


def record_best(state, step: int, values: dict[str, float]) -> bool:
    """Keep ``val/loss`` in the train state (saved with every checkpoint); True when it is a new best."""
    if "val/loss" not in values:
        return False
    state.val_loss = values["val/loss"]
    if state.best_val_loss is not None and state.val_loss >= state.best_val_loss:
        return False
    state.best_val_loss, state.best_val_step = state.val_loss, step
    return True


def best_record(state) -> dict:
    """The validation figures of a run for its summary and ``final/training.json``."""
    return {
        "val_loss": state.val_loss,
        "best_val_loss": state.best_val_loss,
        "best_val_step": state.best_val_step,
    }
