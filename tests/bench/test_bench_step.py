"""`ctrscale bench step`: every batch size from memory and from the loader, each against the
compute-bound limit of the same run, and CowClip's step-time overhead, on a small model.

Nothing here asserts a speed: speed targets are what the benchmark reports (docs/bench-step.md)."""

from __future__ import annotations

import json
import math

import pytest
from runner import run_ctrscale

SMALL = ["model.dnn=[32]", "model.embedding_dim=8", "data.shuffle_buffer_rows=4096"]


@pytest.mark.slow
def test_bench_step_reports_every_batch_size_source_the_cowclip_overhead_and_methods(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "step", "--batch-sizes", "256", "1024", "--with-loader"]
    args += ["--cowclip-overhead", "--repeat", "3", "--methods", "lamb", "gsnr"]
    args += ["--rows", "20000", "--min-seconds", "0.3", "--out", str(out)]
    for override in SMALL:
        args += ["--set", override]
    done = run_ctrscale(args)

    report = json.loads(out.read_text())
    runs = [run for run in report["runs"] if "source" in run]
    assert [(r["batch_size"], r["source"]) for r in runs] == [
        (256, "memory"), (256, "loader"), (1024, "memory"), (1024, "loader"),
    ]  # fmt: skip
    for run in runs:
        assert run["steps"] >= 4 and run["seconds"] >= 0.3
        assert run["rows_per_s"] == pytest.approx(run["steps"] * run["batch_size"] / run["seconds"])
        assert run["fraction_of_limit"] == pytest.approx(
            run["rows_per_s"] / run["compute_bound_rows_per_s"]
        )
        assert run["peak_rss_mib"] > 100
    memory = {r["batch_size"]: r["rows_per_s"] for r in runs if r["source"] == "memory"}
    loader = {r["batch_size"]: r["rows_per_s"] for r in runs if r["source"] == "loader"}
    assert report["smallest_over_largest_rows_per_s"] == pytest.approx(memory[256] / memory[1024])
    assert report["loader_over_memory_rows_per_s"] == pytest.approx(
        {f"fp32 {b}": loader[b] / memory[b] for b in memory}
    )

    (overhead,) = [run for run in report["runs"] if "cowclip_step_time_overhead" in run]
    assert overhead["batch_size"] == 1024 and overhead["rounds"] >= 5
    ratio = overhead["step_seconds"]["on"] / overhead["step_seconds"]["off"]
    # The median of three processes' ratios, and the steps of the process that measured it.
    runs_overheads = overhead["cowclip_step_time_overhead_runs"]
    assert len(runs_overheads) == 3 and math.isclose(ratio - 1.0, sorted(runs_overheads)[1])
    assert report["cowclip_step_time_overhead"] == sorted(runs_overheads)[1]
    assert done.stdout.count("CowClip off/on") == 3 and "rows/s" in done.stdout
    (methods,) = [run for run in report["runs"] if "step_time_over_adam" in run]
    seconds = methods["step_seconds"]
    assert set(seconds) == {"adam", "lamb", "gsnr"}
    assert report["step_time_over_adam"] == pytest.approx(
        {m: seconds[m] / seconds["adam"] for m in ("lamb", "gsnr")}
    )
    assert "× Adam's step time" in done.stdout


@pytest.mark.slow
def test_bench_step_measures_each_precision_against_its_own_limit(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "step", "--batch-sizes", "512", "--precision", "fp32", "bf16",
            "--rows", "20000", "--min-seconds", "0.3", "--out", str(out)]  # fmt: skip
    for override in SMALL:
        args += ["--set", override]
    done = run_ctrscale(args)
    report = json.loads(out.read_text())
    fp32, bf16 = report["runs"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert "train.precision = bf16" in bf16["precision_reason"]
    # Each against the matmul rate of its own dtype: the limits differ.
    assert bf16["compute_bound_rows_per_s"] != fp32["compute_bound_rows_per_s"]
    assert report["bf16_over_fp32_rows_per_s"] == pytest.approx(
        {"512": bf16["rows_per_s"] / fp32["rows_per_s"]}
    )
    assert report["bf16_fraction_of_limit_at_largest"] == bf16["fraction_of_limit"]
    assert " bf16 memory:" in done.stdout


def test_flops_per_row_count_every_matrix_product_of_the_model():
    """DeepFM's FLOPs are its linear layers' (6 per multiply-accumulate: forward and both
    backward products); DCNv2's cross layers and DLRM's pairwise dots add products that a
    count of nn.Linear layers misses."""
    from torch import nn

    from ctrscale.bench.step import train_flops_per_row
    from ctrscale.config import ModelConfig
    from ctrscale.data.schema import SPARSE_FEATURES
    from ctrscale.models import build_model

    def linear_flops(name: str) -> float:
        model = build_model(ModelConfig(name=name), dict.fromkeys(SPARSE_FEATURES, 8))
        layers = (m for m in model.modules() if isinstance(m, nn.Linear))
        return 6.0 * sum(layer.in_features * layer.out_features for layer in layers)

    assert train_flops_per_row(ModelConfig(name="deepfm")) == pytest.approx(
        linear_flops("deepfm"), rel=1e-4
    )
    assert train_flops_per_row(ModelConfig(name="dcnv2")) > 1.1 * linear_flops("dcnv2")
    assert train_flops_per_row(ModelConfig(name="dlrm")) > linear_flops("dlrm")
