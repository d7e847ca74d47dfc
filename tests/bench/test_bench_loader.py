"""`ctrscale bench loader`: one process's rates, and N ranks' aggregate, replicated and sharded.

Nothing here asserts a speed (that is what the benchmark is for): only that every figure is
measured, reported and consistent."""

from __future__ import annotations

import json

import pytest

from ctrscale import cli


def test_bench_loader_reports_one_process_and_the_aggregate_of_two(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "loader.json"
    args = ["bench", "loader", "--data", str(tiny_dataset), "--batch-sizes", "512", "2048",
            "--processes", "1", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads(out.read_text())
    assert results["rows"] > 2048 and len(results["runs"]) == 4
    aggregate = {(r["processes"], r["decode"]): r for r in results["processes"]}
    assert set(aggregate) == {(1, "replicated"), (2, "replicated"), (2, "sharded")}
    for run in aggregate.values():
        assert run["batch_size"] == 2048 and run["rows_per_s"] > 0
        assert run["over_one_process"] == pytest.approx(
            run["rows_per_s"] / aggregate[1, "replicated"]["rows_per_s"]
        )
    printed = capsys.readouterr().out
    assert "2     sharded" in printed and "2  replicated" in printed


@pytest.mark.parametrize("processes", ["0", "3"])
def test_bench_loader_refuses_process_counts_that_cannot_split_the_batch(processes, capsys):
    args = ["bench", "loader", "--batch-sizes", "1024", "--processes", "1", processes]
    assert cli.main(args) == 2
    assert f"--processes {processes}:" in capsys.readouterr().err
