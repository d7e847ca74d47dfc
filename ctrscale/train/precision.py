"""Mixed precision: which arithmetic the dense tower and interaction run in, and the forward
that applies it.

Under bf16 the model's forward runs in `torch.autocast`: matrix products (the DNN, DLRM's
pairwise dots, DCNv2's cross layers) compute in bf16 while parameters, their gradients and the
optimizers' state stay fp32 (autocast casts a bf16 copy per use), the embedding lookups stay
fp32 (FBGEMM's kernels are not autocast ops), and the logits come back as fp32 for the loss
and the metrics. Checkpoints therefore do not depend on the precision.

`auto` picks bf16 only where the device computes it natively: a CUDA device that supports it,
or a CPU with AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`) in /proc/cpuinfo. Elsewhere bf16
is emulated and slower than fp32: measured on an AVX-512 CPU without bf16 instructions, a bf16
`torch.mm` ran at 55 GFLOP/s against 234 in fp32 (issue #15).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from ctrscale.choices import Precision

NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not available)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why."""
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): it asks the current device, not `device`, and by
        # default also says yes where bf16 is only emulated (pre-Ampere GPUs such as V100, T4).
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        if torch.version.hip or major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) only emulates bf16"
    found = [
        flag
        for flag in NATIVE_BF16_CPU_FLAGS
        if flag in (flags if flags is not None else cpu_flags())
    ]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, f"the CPU has neither {' nor '.join(NATIVE_BF16_CPU_FLAGS)} (bf16 is emulated)"


def resolve_precision(
    choice: Precision, device: torch.device, flags: set[str] | None = None
) -> tuple[torch.dtype, str]:
    """The dtype the dense tower computes in, and a sentence saying why."""
    if choice == Precision.FP32:
        return torch.float32, "fp32: train.precision = fp32"
    native, why = native_bf16(device, flags)
    if choice == Precision.BF16:
        slower = "" if native else "; expect it slower than fp32"
        return torch.bfloat16, f"bf16: train.precision = bf16 ({why}{slower})"
    if native:
        return torch.bfloat16, f"bf16: train.precision = auto and {why}"
    return torch.float32, f"fp32: train.precision = auto and {why}"


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `bfloat16`: how run.json and hyperparameters.json name the dtype."""
    return str(dtype).removeprefix("torch.")


def forward_logits(model: nn.Module, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """The model's logits as fp32, its dense tower run in `dtype`."""
    device_type = batch.dense_features.device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(batch.dense_features, batch.sparse_features)
    return logits.float()
