"""Run under torchrun by test_shared_dir.py: every rank checks `BASE` (one shared directory)
or `BASE/node-RANK` (node-local directories of the same name on each machine)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from ctrscale.distributed.shared_dir import check_shared_directory
from ctrscale.errors import CtrscaleError

if __name__ == "__main__":
    base, layout = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = base if layout == "shared" else base / f"node-{rank}"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        check_shared_directory(directory, rank, world)
        outcome = "ok"
    except CtrscaleError as exc:
        outcome = str(exc)
    (base / f"rank-{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()
