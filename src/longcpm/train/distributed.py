"""torch.distributed plumbing for the trainer: process-group setup from torchrun's environment, DDP or FSDP2
(`torch.distributed.fsdp.fully_shard`) wrapping, and full (unsharded) state dicts for rank-0 checkpoints.

Launch: `torchrun --nproc_per_node N -m longcpm.train RUN.toml`. The backend is NCCL on CUDA and gloo on CPU;
both DDP and FSDP2 run on CPU/gloo with torch >= 2.6, which is how the tests check them. Data sharding is not
here: every rank reads the same row stream and keeps its slice (train/data.py rank_slice).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo, parallel: str, layers: nn.ModuleList | None = None) -> nn.Module:
    """DDP, or FSDP2 with one shard group per decoder layer plus the root (embeddings, final norm, lm_head, so a
    tied lm_head stays in one group). A single process gets the module back unchanged."""
    if not info.distributed:
        return module
    if parallel == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # an explicit mesh on the run's device: the default picks CUDA whenever it exists, even for a CPU run
        mesh = init_device_mesh(info.device.type, (info.world,))
        for layer in layers if layers is not None else []:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def no_sync(module: nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation (DDP) or the
    reduce-scatter (FSDP2); a no-op for a single process."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if is_fsdp(module):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict (rank 0 gets it under FSDP; collective, so every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded (rank 0 under FSDP; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state: every rank passes the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
