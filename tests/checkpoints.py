"""Checkpoint helpers only the tests need: the newest verified checkpoint, a full verify, and the whole
tensors of a sharded (DCP) checkpoint in one process."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed import checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tristage.train.training import checkpoint_files
from tristage.train.training.dcp import FOLDER


def verify(path: Path) -> checkpoint_files.TrainState:
    """Check that every file of a checkpoint loads; returns its counters."""
    return checkpoint_files.read(path).state


def latest(root: Path) -> Path | None:
    """The newest checkpoint that verifies (demoting damaged newer ones, as a resume does)."""
    found = checkpoint_files.newest_readable(root)
    return None if found is None else found[0]


def read_full(path: Path, entry: str) -> dict[str, torch.Tensor]:
    """Whole tensors of one entry (``model`` or ``ema``) of a sharded checkpoint, in one process."""
    folder, prefix = path / FOLDER, f"{entry}."
    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    torch_dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return {key[len(prefix) :]: value for key, value in tensors.items()}
