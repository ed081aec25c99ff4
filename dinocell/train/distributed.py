"""The rank's place in a torchrun job: `DistEnv`, device resolution, process-group setup, object all-gather.

Started by torchrun (env:// rendezvous: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); nccl on GPU, gloo on CPU;
each rank on device cuda:LOCAL_RANK. A single process (WORLD_SIZE unset or 1) gets a DistEnv of world size 1 and no
process group. An already initialised process group (a test harness, a notebook) is reused, not re-created.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["REQUIRED_GPUS_ENV", "DistEnv", "all_gather_objects", "required_gpus", "resolve_device", "setup_distributed"]


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this process created the process group (and destroys it at the end)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Set on training pods by the launcher (dinocell.launch.step) to the GPUs the pod requested: such a job must never
# fall back to training on CPU (a wrong image or node would otherwise burn hours at CPU speed).
REQUIRED_GPUS_ENV = "DINOCELL_REQUIRED_GPUS"


def required_gpus() -> int:
    value = os.environ.get(REQUIRED_GPUS_ENV, "").strip()
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        raise ValueError(f"{REQUIRED_GPUS_ENV}={value!r}: expected a number of GPUs") from None


def resolve_device(spec: str, local_rank: int) -> torch.device:
    """train.device ("cpu", "cuda", "cuda:N" or "auto") as the torch device of the rank with `local_rank`.

    When the pod requested GPUs (DINOCELL_REQUIRED_GPUS > 0), "auto" and "cpu" fail instead of training on CPU.
    """
    wanted = required_gpus()
    if wanted and not torch.cuda.is_available():
        raise RuntimeError(f"requested {wanted} GPUs, CUDA not available: wrong image or node "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    if spec == "cpu":
        if wanted:
            raise RuntimeError(f"requested {wanted} GPUs but train.device is 'cpu': set train.device to auto or cuda")
        return torch.device("cpu")
    if spec.startswith("cuda") or spec == "auto":
        if not torch.cuda.is_available():
            if spec == "auto":
                return torch.device("cpu")
            raise RuntimeError(f"train.device={spec!r} but CUDA is not available")
        if spec.startswith("cuda:"):
            return torch.device(spec)
        return torch.device("cuda", local_rank)
    raise ValueError(f"train.device: unknown device {spec!r}")


def setup_distributed(train_cfg) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (or reuse an initialised one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(train_cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(minutes=train_cfg.dist_timeout_min),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
        initialized_here = True
    return DistEnv(rank, world, local_rank, device, initialized_here)


def all_gather_objects(env: DistEnv, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; [obj] in a single process)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
