"""All of fm's torch.distributed code: process groups, the device mesh, and `parallelize`.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) `init_distributed` joins the process
group: NCCL on GPUs, gloo on CPU. Without torchrun it is a single process and nothing here
touches torch.distributed. Models stay single-device nn.Modules; `parallelize` applies, in a
fixed order, activation checkpointing, torch.compile and then data parallelism (DDP, or FSDP2
`fully_shard` per block and then the root, optionally with CPU offload).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group if there is one; pick the device (cuda:LOCAL_RANK or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=dev if use_cuda else None)
    return Dist(rank, world, local_rank, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over all processes; the value itself in a single process."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_object(obj):
    """Rank 0's Python object on every rank (small things: a path, a step number)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute this block's activations in the backward pass instead of storing them.

    The block's own forward is wrapped in place, so parameter names (and so checkpoints)
    stay those of the plain model.
    """
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def parallelize(model: nn.Module, d: Dist, mode: str = "ddp", activation_checkpointing: bool = False,
                compile: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Apply training-time wrappers to a single-device model, in this order:

    1. activation checkpointing per block (before compile, so compile sees the recompute regions);
    2. torch.compile per block (a repeated block compiles once and keeps graph breaks local);
    3. data parallelism over all processes: DDP, or FSDP2 `fully_shard` on every block and then
       on the root (the embedding, final norm and tied head), with optional CPU offload of
       parameters, gradients and optimizer state.
    Returns the module to train (the DDP wrapper, or the model itself for FSDP2 / one process).
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    blocks = model.layers
    for block in blocks:
        if activation_checkpointing:
            _checkpoint_block(block)
        if compile:
            block.compile()
    if not d.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("dp",))
    kwargs = {"mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 modifies the model in place, nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model
