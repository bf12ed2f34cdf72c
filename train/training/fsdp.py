"""Sharded data parallelism: ``train.parallelism`` -> torch's FSDP2 ``fully_shard``.

The Trainer applies ``fully_shard`` itself, one FSDP unit per transformer block plus the root (the
embedders, the final layer), rather than through accelerate's FSDP plugin: the same code path runs in
CI (2 CPU processes, gloo) and on a GPU cluster, and the launch config stays plain data parallel
(``configs/accelerate/ddp.yaml``, ``multinode.yaml``).  Parameters become DTensors sharded on dim 0,
so the gradients, AdamW's state and the EMA (built from those parameters) are sharded with them.

* ``fsdp``: parameters re-sharded after the forward (ZeRO-3; least memory, an extra all-gather in the
  backward);
* ``fsdp_grad_op``: parameters kept gathered from the forward to the end of the backward
  (``reshard_after_forward=False``, ZeRO-2-like: more memory, less traffic);
* ``ddp``: accelerate's DistributedDataParallel (every rank holds everything).

Without a process group (a plain ``tristage train``, not under ``accelerate launch`` / torchrun) the
model stays whole and only the checkpoint format (``train/training/dcp.py``) follows the setting,
so a sharded run resumes on one process; one process under torchrun shards over a 1-rank mesh (the
FSDP code path on one GPU, as ``bench/gpu.sh`` runs it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# A sharded train.parallelism (train/config.py SHARDED_PARALLELISMS) -> fully_shard's reshard_after_forward.
RESHARD_AFTER_FORWARD: dict[str, bool] = {"fsdp": True, "fsdp_grad_op": False}


def shard(model: torch.nn.Module, parallelism: str, device: torch.device, bf16: bool) -> bool:
    """``fully_shard`` every transformer block, then the root, over all processes; False if not sharded.

    ``bf16`` on CUDA: blocks compute in bf16 (``MixedPrecisionPolicy``), gradients are reduced in
    fp32 and the sharded master weights stay fp32, as under DDP with autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if parallelism not in RESHARD_AFTER_FORWARD or not dist.is_initialized():  # ddp, or one process
        return False
    reshard = RESHARD_AFTER_FORWARD[parallelism]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    # The root's parameters (embedders, final layer) are used last in the forward and first in the
    # backward, so re-sharding them after the forward would only add an all-gather.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (``shard`` applied)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded parameters; returns it as a plain 0-dim tensor.

    ``torch.nn.utils.clip_grad_norm_`` would return a DTensor, which cannot mix with the loss in the
    NaN guard; the norm is reduced over the shards here (one all-reduce) and read as a local tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def gather_full(tensors: dict[str, torch.Tensor], is_main: bool) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU of the main process (every rank must call it; the others get {}).

    One all-gather per tensor, in ``tensors``' order (the same on every rank), so no rank ever holds
    more than one gathered tensor beyond the main process's CPU copy."""
    full = {}
    for name, value in tensors.items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            full[name] = whole.detach().cpu()
    return full


def whole_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) model of ``model``'s class and config holding ``weights`` (on the CPU).

    Built from the diffusers config (``from_config``), so it saves with ``save_pretrained`` exactly
    like the unsharded model would; the tensors ``weights`` lacks must be buffers, which the config
    rebuilds."""
    cls = _model_class(model)
    copy = cls.from_config(model.config)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    params = {n for n, _ in copy.named_parameters()}
    if unexpected or params & set(missing):
        raise KeyError(f"{cls.__name__}: weights do not fit (missing {missing[:3]}, extra {unexpected[:3]})")
    return copy


def _model_class(model: torch.nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps in a dynamic ``FSDP<class>(FSDPModule, class)``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    return cls.__mro__[2] if isinstance(model, FSDPModule) else cls
