"""The metrics window: loss, gradient norm and per-timestep-bucket loss summed on the device between
log steps, flushed (one all-reduce, one host sync) into the values the trackers and ``metrics.jsonl`` get."""

from __future__ import annotations

import time

import torch

TIMESTEP_BUCKETS = 4  # loss is also logged per quarter of the timestep range


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
        """Sum every scalar metric (loss, its terms, grad_norm, repa_loss...); bucket the per-sample loss."""
        for key, value in metrics.items():
            if value.dim() == 0:
                self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value.float()
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
