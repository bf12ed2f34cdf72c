"""One rank of a ``tristage bench train --parallelism`` run (started by ``accelerate launch``).

Runs the real Trainer on the given config, then writes ``OUT/rank{R}.json``: this process's peak memory
(CUDA max allocated, else peak RSS) and the bytes of training state it holds (its shards of the weights,
AdamW's moments and the EMA; whole tensors under DDP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor


def local_bytes(tensors) -> int:
    """Bytes of the tensors as this process stores them (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def state_bytes(trainer) -> dict[str, int]:
    moments = [v for s in trainer.adamw.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "weights": local_bytes(p.detach() for p in trainer.model.parameters()),
        "adamw": local_bytes(moments),
        "ema": local_bytes(trainer.ema.shadow),
    }


def main(argv: list[str]) -> None:
    from tristage.bench.train import peak_memory_gb
    from tristage.train.config import load_config
    from tristage.train.training.trainer import Trainer

    config, out = argv
    trainer = Trainer(load_config(config))
    trainer.train()
    device = trainer.accelerator.device
    report = {"peak_mem_gb": round(peak_memory_gb(device), 4), "state_bytes": state_bytes(trainer)}
    Path(out, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
