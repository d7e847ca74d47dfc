"""How often one training step makes the host wait for the device in ctrscale's own code.

On CUDA a read of a device value (`.item()`, `bool()`, `.tolist()`) or an op whose output
size depends on the data (`nonzero`, boolean-mask indexing, `unique`, `repeat_interleave`
without `output_size`) stalls the CPU until the GPU catches up. On CPU they are observable:
these tests count them in one step, attributed to the innermost Python frame (so library
internals are not counted), and pin the number — a fixed few per TBE, never one per table.
Reads of host-resident counters (the embedding optimizer's step count) are not waits."""

from __future__ import annotations

import collections
import traceback

import cowclip_reference as ref
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctrscale.config import load_config
from ctrscale.distributed.context import init_distributed
from ctrscale.train.step import build_trainer

DATA_DEPENDENT = {
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
}


# torch's thin Python wrappers around an op (torch.unique_consecutive, Tensor.__bool__, …):
# skipped, so the op is attributed to the code that called the wrapper.
WRAPPERS = ("torch/functional.py", "torch/_tensor.py", "torch/_jit_internal.py",
            "torch/overrides.py", "torch/utils/_python_dispatch.py", "torch/_ops.py",
            "torch/_compile.py", "torch/_dynamo/eval_frame.py")  # fmt: skip


def _ctrscale_site() -> str | None:
    """`file:function` of the innermost caller if it is ctrscale's own code, else None."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if path == __file__ or path.endswith(WRAPPERS):
            continue
        if "/ctrscale/" in path and "/tests/" not in path:
            return f"{path.rsplit('/ctrscale/', 1)[1]}:{frame.name}"
        return None
    return None


class HostWaits(TorchDispatchMode):
    def __init__(self, host_resident: list[torch.Tensor]) -> None:
        super().__init__()
        self.host_resident = host_resident
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        waits = name in DATA_DEPENDENT
        if name == "aten._local_scalar_dense.default":
            waits = not any(args[0] is t for t in self.host_resident)
        if name == "aten.index.Tensor":
            waits = any(i is not None and i.dtype == torch.bool for i in args[1])
        if name == "aten.repeat_interleave.Tensor":
            waits = kwargs.get("output_size") is None
        if waits and (site := _ctrscale_site()) is not None:
            self.sites[site] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    ("sharding", "clip", "expected"),
    [
        # One TBE: the multi-valued check, the present lookups, the id segments.
        ("table_wise", "paper", 3),
        # One data-parallel TBE: the check, its looked-up bags, the looked-up rows and the
        # per-table split sizes — the same for 3 tables or 300.
        ("data_parallel", "off", 4),
    ],
)
def test_one_step_waits_for_the_device_a_fixed_few_times(
    single_process_group, monkeypatch, sharding, clip, expected
):
    config = load_config(
        None,
        [
            'distributed.device="cpu"',
            f'distributed.sharding_type="{sharding}"',
            f"data.batch_size={ref.GLOBAL_BATCH}",
            "model.embedding_dim=8",
            "model.dnn=[16]",
            'optim.embedding.name="adam"',
            "optim.embedding.l2=1e-5",
            f'optim.cowclip.mode="{clip}"',
        ],
    )
    ctx = init_distributed(config.distributed)
    sizes = dict.fromkeys(ref.SPARSE_FEATURES, ref.TABLE_ROWS)
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=3, total_steps=3)
    first, second = ref.global_batches()[:2]
    trainer.step(first, ref.GLOBAL_BATCH, 0)  # lazily built state is not a per-step cost

    waits = HostWaits([trainer.embedding.optimizer.steps])
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        if (site := _ctrscale_site()) is not None:
            waits.sites[site] += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with waits:
        trainer.step(second, ref.GLOBAL_BATCH, 1)
    assert sum(waits.sites.values()) == expected, dict(waits.sites)
