"""Process settings of the `ctrscale` entry point (ctrscale/runtime.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Minor page faults of steps 3-6 of an MLP training loop whose activations (40K × 256 floats,
# 39 MiB) are above glibc's largest mmap threshold, like a large-batch step's.
STEADY_STATE_FAULTS = """
import resource, sys, torch
from ctrscale.runtime import keep_freed_memory
if sys.argv[1] == "tuned":
    keep_freed_memory()
torch.manual_seed(0)
layers = [torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(256, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(40_000, 64)
for step in range(6):
    if step == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def steady_state_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", STEADY_STATE_FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_steps_reuse_freed_activation_memory_instead_of_faulting_it_in_again():
    default, tuned = steady_state_faults("default"), steady_state_faults("tuned")
    pages_per_step = 40_000 * 256 * 4 // 4096
    assert default > 4 * pages_per_step  # every step's large tensors come back from the kernel
    assert tuned < default / 4
