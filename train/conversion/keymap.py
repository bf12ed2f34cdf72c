"""Shared machinery of every weight conversion: strict key maps, reading weights files and folders.

Every conversion is strict: the full target state dict is built and loaded with ``strict=True``, and a
source tensor that no rule consumed is an error naming it (:class:`Tracked`).
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

StateDict = dict[str, torch.Tensor]
WB = ("weight", "bias")

# Training checkpoints wrap their weights: DiT's train.py saves {"model", "ema", "opt", "args"}
# (https://github.com/facebookresearch/DiT/blob/main/train.py), PixArt-alpha's trainer
# {"state_dict", "state_dict_ema", ...}. Which inner dict each choice takes, first present wins
# (DiT's own sample.py takes "ema" when there is one); a bare state dict is taken as it is.
WEIGHTS_CHOICES: dict[str, tuple[str, ...]] = {
    "ema": ("ema", "state_dict_ema", "model", "state_dict"),
    "model": ("model", "state_dict"),
}


class Tracked(dict):
    """A state dict that remembers which keys were read, so a conversion can prove it used every tensor."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def assert_all_read(self, what: str) -> None:
        left = sorted(set(self) - self.read)
        if left:
            raise ValueError(f"{what}: source keys not consumed by any mapping rule: {listing(left)}")


def listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = list(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def check_keys(state: Mapping[str, torch.Tensor], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not match: missing keys: {listing(missing)}; "
            f"unexpected keys: {listing(unexpected)}"
        )


def detached(module: nn.Module) -> StateDict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def as_dtype(model, dtype: torch.dtype):
    """``model.to(dtype)`` only when it changes something (diffusers logs a notice on every cast)."""
    return model if model.dtype == dtype else model.to(dtype)


def num_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Depth = 1 + the largest block index; gaps surface later as missing keys."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def with_wb(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(a, b) -> (a.weight, b.weight), (a.bias, b.bias)."""
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in WB]


def head_dim(dim: int, heads: int) -> int:
    if dim % heads:
        raise ValueError(f"hidden size {dim} is not divisible by num_attention_heads={heads}")
    return dim // heads


def model_folder(path: Path) -> Path:
    """The folder itself, or its ``transformer/`` subfolder (a stage ``final/`` or a pipeline folder)."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{path}: no config.json in it or in its transformer/ subfolder")


def read_safetensors(folder: Path) -> StateDict:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state: StateDict = {}
    for name in files:
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: weight file {name} is missing")
        state.update(load_file(folder / name))
    return state


def unwrap_state_dict(state: Mapping, weights: str = "ema") -> Mapping[str, torch.Tensor]:
    """The weights inside a training checkpoint (:data:`WEIGHTS_CHOICES`), or ``state`` itself."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    for key in WEIGHTS_CHOICES[weights]:
        inner = state.get(key)
        if isinstance(inner, Mapping):
            return inner
    return state


def read_weights_file(path: str | Path, weights: str = "ema") -> Mapping[str, torch.Tensor]:
    """A ``.safetensors`` or ``torch.save`` file, unwrapped (:func:`unwrap_state_dict`).

    ``torch.save`` zip archives are memory-mapped: reading a multi-GB checkpoint just to look at its keys
    (as ``init_from`` does to tell the layout) costs no copy. DiT's train.py checkpoints also pickle
    the run's ``argparse.Namespace``; that one class is allowed next to tensors (``weights_only``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    return unwrap_state_dict(state, weights)
