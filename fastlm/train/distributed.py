"""Many processes: torchrun's environment, DistributedDataParallel, FSDP2 and activation checkpointing.

Nothing here is home-made parallelism: DDP (``torch.nn.parallel.DistributedDataParallel``)
averages gradients, FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters,
gradients and optimizer state per block, and full state dicts for checkpoints come from
``torch.distributed.checkpoint.state_dict``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
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


def setup(device_choice: str = "auto") -> Env:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, start the process group (NCCL on GPUs,
    gloo on CPUs) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
        device = torch.device("cuda", local_rank) if device_choice == "cuda" else torch.device(device_choice)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_choice)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world, local_rank, device)


def teardown(wait_for_peers: bool = False) -> None:
    if dist.is_available() and dist.is_initialized():
        # After a run that finished, every rank reaches the end before any tears down: a rank
        # destroying its gloo group while a peer still had work in flight aborted once at exit
        # ("terminate called without an active exception", SIGABRT, the run itself complete).
        # Not after an error: a peer may never come to the barrier.
        try:
            if wait_for_peers:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, env: Env):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: elements of the model's ModuleLists. A block whose class has no
    forward of its own (GPT's Block: the model calls its attention, MLP and norms directly)
    gives its children instead, since hooks fire only on modules that are called."""
    units = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                if type(block).forward is torch.nn.Module.forward:
                    units.extend(block.children())
                else:
                    units.append(block)
    return units


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Recompute each block's activations in the backward instead of storing them
    (torch.utils.checkpoint, non-reentrant, RNG state preserved). Returns how many blocks."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for unit in _units(model):
        if isinstance(unit, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            continue  # a norm's activations are cheaper to keep than to recompute
        forward = unit.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        unit.forward = wrapped
        count += 1
    return count


def wrap(model: torch.nn.Module, env: Env, fsdp: bool, amp: bool) -> torch.nn.Module:
    """DDP or FSDP2 around the model (nothing with one process and no --fsdp)."""
    if fsdp:
        if not env.distributed:
            raise SystemExit("--fsdp needs several processes: torchrun --nproc_per_node N -m fastlm train --fsdp ...")
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # FSDP2 warns that a sharded module returns a view (the attention and MLP outputs);
        # the models only add such outputs out of place (into the fused residual norms).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        kwargs = {}
        if amp and env.device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in _units(model):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def full_model_state(model: torch.nn.Module, raw: torch.nn.Module, fsdp: bool) -> dict:
    """The whole state dict on rank 0 (FSDP: gathered to CPU; a collective on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw.state_dict()


def full_optimizer_state(model, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


__all__ = ["Env", "checkpoint_activations", "setup", "teardown", "wrap"]
