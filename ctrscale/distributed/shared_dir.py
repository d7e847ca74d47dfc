"""Whether every rank sees the same directory: checkpoints and run files assume it.

A sharded checkpoint is written by every rank into one directory that rank 0 then renames
into place; on several nodes that only works on a filesystem all of them mount (NFS, Lustre,
a FUSE-mounted bucket). Node-local paths look the same by name and silently split a
checkpoint over machines, so `ctrscale train` checks once at the start: rank 0 writes a random
token into `--out`, and every rank must read it back.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from ctrscale.errors import CtrscaleError

PROBE = ".shared-directory-probe"


def check_shared_directory(directory: Path, rank: int, world_size: int) -> None:
    """Raise on every rank unless all ranks read rank 0's token from `directory`."""
    if world_size == 1:
        return
    probe = directory / PROBE
    token = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        probe.write_text(token[0])
    dist.broadcast_object_list(token, src=0)  # also orders the write before the reads
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views: list = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    dist.barrier()  # every rank has read it before it goes
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise CtrscaleError(
            f"--out {directory} is not one shared directory: {', '.join(blind)} cannot see "
            "what rank 0 wrote there. Checkpoints are written by every rank into one "
            "directory: put --out on a filesystem every node mounts (NFS, Lustre, a mounted "
            "bucket)"
        )
