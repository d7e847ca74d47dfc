"""train.precision: which arithmetic `auto` picks and why, what bf16 changes (the dense tower's
matrix products) and what it does not (embeddings, logits, parameters, checkpoints), and bf16
training of every model, also sharded over 2 processes."""

from __future__ import annotations

import json

import pytest
import torch
from runner import metrics, run_ctrscale, tiny_overrides, train_args
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ctrscale.choices import Precision
from ctrscale.config import ModelConfig
from ctrscale.data.schema import DENSE_FEATURES, SPARSE_FEATURES
from ctrscale.models import build_model
from ctrscale.train.precision import cpu_flags, forward_logits, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("choice", "flags", "dtype", "said"),
    [
        ("fp32", {"amx_bf16"}, torch.float32, "train.precision = fp32"),
        ("auto", {"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16, "the CPU has amx_bf16"),
        ("auto", {"avx512f", "avx512_bf16"}, torch.bfloat16, "the CPU has avx512_bf16"),
        ("auto", {"avx2", "avx512f"}, torch.float32, "bf16 is emulated"),
        ("bf16", {"avx2"}, torch.bfloat16, "expect it slower than fp32"),
        ("bf16", {"amx_bf16"}, torch.bfloat16, "the CPU has amx_bf16"),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(choice, flags, dtype, said):
    chosen, reason = resolve_precision(Precision(choice), CPU, flags)
    assert chosen == dtype and said in reason
    assert reason.startswith("bf16" if dtype == torch.bfloat16 else "fp32")


@pytest.mark.parametrize(
    ("capability", "dtype", "said"),
    [((7, 0), torch.float32, "7.0) only emulates bf16"), ((8, 0), torch.bfloat16, "tensor cores")],
)
def test_auto_picks_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, dtype, said):
    # A V100 can hold bf16 tensors (torch.cuda.is_bf16_supported() says yes) but emulates the math.
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "GPU")
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen, reason = resolve_precision(Precision.AUTO, torch.device("cuda", 1))
    assert chosen == dtype and said in reason
    assert asked == [torch.device("cuda", 1)]


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t\t: spectre\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


def tiny_batch(rows: int = 16) -> Batch:
    return Batch(
        dense_features=torch.rand(rows, len(DENSE_FEATURES)),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=list(SPARSE_FEATURES),
            values=torch.randint(0, 8, (rows * len(SPARSE_FEATURES),)),
            lengths=torch.ones(rows * len(SPARSE_FEATURES), dtype=torch.int32),
        ),
        labels=torch.randint(0, 2, (rows,)).float(),
    )


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "dcnv2", "wide_deep"])
def test_bf16_runs_the_dense_tower_in_bf16_and_returns_fp32_logits(name):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name=name, dnn=[16, 8], embedding_dim=8),
        dict.fromkeys(SPARSE_FEATURES, 8),
        embedding_device=CPU,
    )
    linear_outputs, pooled = [], []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, i, out: linear_outputs.append(out.dtype))
    model.embedding_bag_collection.register_forward_hook(
        lambda m, i, out: pooled.append(out.values().dtype)
    )
    batch = tiny_batch()
    reference = forward_logits(model, batch, torch.float32)
    linear_outputs.clear()
    logits = forward_logits(model, batch, torch.bfloat16)
    assert logits.dtype == torch.float32 and pooled[-1] == torch.float32
    assert linear_outputs and set(linear_outputs) == {torch.bfloat16}
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1e-2, not exactly.
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05)
    assert not torch.equal(logits, reference)
    logits.sum().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_a_bf16_run_trains_like_fp32_and_its_checkpoint_is_precision_free(tiny_dataset, tmp_path):
    settings = {"train.max_steps": 6}
    fp32 = tmp_path / "fp32"
    run_ctrscale(train_args(fp32, tiny_overrides(tiny_dataset, **settings)))
    bf16 = tmp_path / "bf16"
    overrides = tiny_overrides(tiny_dataset, **settings, **{"train.precision": "bf16"})
    run_ctrscale(train_args(bf16, overrides))
    ran = json.loads((bf16 / "run.json").read_text())["starts"][-1]
    assert ran["precision"] == "bfloat16" and "train.precision = bf16" in ran["precision_reason"]
    assert metrics(bf16)["auc"] == pytest.approx(metrics(fp32)["auc"], abs=0.01)
    assert metrics(bf16)["auc"] != metrics(fp32)["auc"]  # bf16 really ran
    # The same checkpoint scored in fp32: the parameters are fp32 whatever trained them.
    as_fp32 = [o for o in overrides if not o.startswith("train.precision")]
    scored = run_ctrscale(["evaluate", "--checkpoint", str(bf16), *(f"--set={o}" for o in as_fp32)])
    auc = json.loads(scored.stdout.strip().splitlines()[-1])["auc"]
    assert auc == pytest.approx(metrics(bf16)["auc"], abs=0.005)


@pytest.mark.slow
def test_bf16_trains_sharded_over_two_processes(tiny_dataset, tmp_path):
    # DCNv2 (cross layers and an MLP in bf16) with column-split tables: an all-to-all of
    # fp32 embeddings in front of a bf16 tower.
    overrides = tiny_overrides(
        tiny_dataset,
        **{"train.max_steps": 3, "train.precision": "bf16", "model.name": "dcnv2",
           "distributed.sharding_type": "column_wise", "distributed.column_shard_dim": 4},
    )  # fmt: skip
    run_ctrscale(train_args(tmp_path / "run", overrides), nproc=2)
    assert metrics(tmp_path / "run")["world_size"] == 2
    assert 0.4 < metrics(tmp_path / "run")["auc"] < 1.0
