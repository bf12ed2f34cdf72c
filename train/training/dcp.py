"""Sharded checkpoint files (``train.parallelism: fsdp | fsdp_grad_op``) through torch.distributed.checkpoint.

A sharded checkpoint holds, instead of ``model.safetensors`` / ``ema.safetensors`` / ``optimizer.pt``,
one DCP folder ``step_NNNNNNN/sharded/`` (``.metadata`` plus one ``__R_0.distcp`` per rank) with three
entries, keyed by parameter name (``get_state_dict``: the same names as an unsharded model)::

    model   the trained weights          (each rank writes its own shards)
    optim   AdamW's state and param groups
    ema     the EMA shadow               (sharded like the weights it follows)

No rank ever gathers the full state to write it.  On load DCP re-shards to the current layout: the
same number of processes, another number, or one process with a whole model (no process group).
Everything else (``trainer.json``, the RNG files, ``config.yaml``, ``COMPLETE`` last) is as in
``checkpoint_files.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tristage.errors import CheckpointError

FOLDER = "sharded"  # the DCP folder inside a checkpoint directory


class ShardedCheckpointError(CheckpointError):
    """A sharded checkpoint folder that cannot be used; the message names the path."""


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / FOLDER).is_dir()


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict) -> None:
    """Every rank writes its shards of model, optimizer and EMA into ``path/sharded`` (collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema}, checkpoint_id=path / FOLDER)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict) -> None:
    """Fill model, optimizer and the EMA tensors (in place) from ``path/sharded``, re-sharded to the
    current layout (collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema}
    dcp.load(state, checkpoint_id=path / FOLDER)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def verify(path: Path) -> None:
    """The metadata reads and every shard file it names is there, at least as long as it says."""
    folder = path / FOLDER
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as err:  # DCP raises OSError, pickle or EOF errors for a damaged .metadata
        raise ShardedCheckpointError(f"{folder}: unreadable .metadata ({type(err).__name__})") from None
    ends: dict[str, int] = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        file = folder / name
        if not file.is_file() or file.stat().st_size < end:
            raise ShardedCheckpointError(f"{file}: missing or truncated shard file")
