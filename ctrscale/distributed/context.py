"""Process-group set-up: one code path for 1 CPU process, N gloo processes and N nccl GPUs.

Rank and world size come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without them the run is a single process. Device
and backend come from the configuration (`auto` = cuda+nccl when a GPU is visible, else cpu+gloo).
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ctrscale.config import DistributedConfig
from ctrscale.errors import CtrscaleError

# What torchrun sets for its children; a process started from one (a benchmark's or a test's
# child) must not inherit them, or it would join its parent's process group.
LAUNCHER_VARIABLES = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
)


def child_environment() -> dict[str, str]:
    """This process's environment for a child that starts its own process group."""
    return {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes what all ranks share."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Every rank waits here for the others (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device_and_backend(config: DistributedConfig, local_rank: int) -> tuple[str, str]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CtrscaleError("distributed.device=cuda, but no CUDA device is visible")
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise CtrscaleError("distributed.backend=nccl needs distributed.device=cuda")
    return device, backend


def cuda_index(local_rank: int, visible: int) -> int:
    """This rank's GPU: LOCAL_RANK among the visible ones, or the only one when a scheduler
    gives each rank a single GPU (CUDA_VISIBLE_DEVICES per rank, visible = 1)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise CtrscaleError(
            f"LOCAL_RANK {local_rank} but only {visible} GPUs are visible: start at most "
            f"{visible} processes per node (torchrun --nproc_per_node)"
        )
    return local_rank


def init_distributed(config: DistributedConfig, timeout_s: float = 1800.0) -> DistContext:
    """Join (or create) the default process group; idempotent within one process."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device_type, backend = resolve_device_and_backend(config, local_rank)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing a host split its cores; more threads than cores makes OpenMP's
        # barriers spin against each other (on a busy 2-core host a 2-thread cat ran 18× slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise CtrscaleError(
                f"a {dist.get_backend()} process group already exists; the config asks for "
                f"{backend}"
            )
        return DistContext(
            dist.get_rank(), dist.get_world_size(), local_rank, local_world_size, device, backend
        )
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        # nccl: bind the communicator to this rank's GPU now, not lazily at the first
        # collective (which may then pick the wrong device).
        device_id=device if backend == "nccl" else None,
    )
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def global_sum(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """Sums over every rank, in one all-reduce (a no-op in a single process)."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def shutdown_distributed() -> None:
    """Destroy the process groups and join their threads while the interpreter is alive.

    A gloo group left to interpreter finalization aborts the process now and then: its worker
    thread frees the last collective's work object, which decrefs Python tensors, takes the
    GIL during `Py_Finalize` and is terminated ("terminate called without an active
    exception"; pytorch/pytorch#190489, seen as ~1 in 5 failed two-process evaluations here).
    `destroy_process_group` alone does not stop those threads: models and sharded tensors in
    reference cycles still hold the group, so a collection must free it first."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
