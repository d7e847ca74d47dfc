"""`ctrscale bench auc-vs-batch`: rule parsing, aggregation over seeds, refusals, and sweeps
end to end (the quick preset; a small sweep run twice to check that finished runs are skipped).

Nothing here asserts which rule wins: the quick preset is far too small for that."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from runner import run_ctrscale
from support import REPO_ROOT

from ctrscale import cli
from ctrscale.bench.methods import parse_rule
from ctrscale.bench.report import best_base, markdown_table, mean_std, summarize
from ctrscale.errors import CtrscaleError

QUICK = REPO_ROOT / "pipelines" / "quick.toml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A model can beat the Bayes-optimal AUC of a finite test split only by sampling luck; on the
# quick preset's 6,000 test rows that luck stays well below one point.
BAYES_TOLERANCE = 0.01


def bench_args(out: Path, *extra: str) -> list[str]:
    return ["bench", "auc-vs-batch", "--config", str(QUICK), "--out", str(out), *extra]


def read_results(out: Path) -> tuple[list[dict[str, str]], dict]:
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((out / "results.json").read_text())


def assert_csv_matches_json(csv_rows: list[dict[str, str]], json_rows: list[dict]) -> None:
    assert len(csv_rows) == len(json_rows)
    for from_csv, from_json in zip(csv_rows, json_rows, strict=True):
        buckets = {f"auc[{label}]": auc for label, auc in from_json["buckets"].items()}
        from_json = {**{k: v for k, v in from_json.items() if k != "buckets"}, **buckets}
        assert set(from_csv) == set(from_json)
        for key, value in from_json.items():
            if isinstance(value, float):
                assert float(from_csv[key]) == pytest.approx(value, rel=1e-12), key
            else:
                assert from_csv[key] == str(value), key


@pytest.mark.parametrize(
    ("name", "scaling_rule", "dense"),
    [
        ("cowclip", "cowclip", None),
        ("cowclip+lamb", "cowclip", "lamb"),
        ("sqrt+lars", "sqrt", "lars"),
    ],
)
def test_rule_names_split_into_scaling_rule_and_dense_optimizer(name, scaling_rule, dense):
    variant = parse_rule(name)
    assert (variant.name, variant.scaling_rule) == (name, scaling_rule)
    clip = "paper" if scaling_rule == "cowclip" else "off"
    expected = [f'optim.schedule.rule="{scaling_rule}"', f'optim.cowclip.mode="{clip}"']
    expected += [f'optim.dense.name="{dense}"'] if dense else []
    assert variant.overrides() == expected


def test_the_dense_modifier_selects_the_official_codes_embedding_update():
    assert parse_rule("cowclip+dense").overrides()[-1] == 'optim.embedding.semantics="dense"'


def test_a_presets_modifiers_add_methods_and_override_built_in_ones():
    preset = {
        "lars": ['optim.dense.name="lars"', "optim.dense.lr=8.0"],
        "ramp": ["data.ramp_from_batch_size=256", "data.ramp_steps=70"],
    }
    assert parse_rule("cowclip+lars+ramp", preset).overrides() == [
        'optim.schedule.rule="cowclip"',
        'optim.cowclip.mode="paper"',
        'optim.dense.name="lars"',
        "optim.dense.lr=8.0",
        "data.ramp_from_batch_size=256",
        "data.ramp_steps=70",
    ]
    assert parse_rule("none+lars").overrides()[-1] == 'optim.dense.name="lars"'  # built-in
    with pytest.raises(CtrscaleError, match="ramp"):
        parse_rule("cowclip+ramp")  # only the preset knows it


def test_a_preset_modifier_reaches_every_runs_config(tmp_path):
    preset = tmp_path / "preset.toml"
    preset.write_text(
        QUICK.read_text()
        + '\n[bench.modifiers]\nlars = [\'optim.dense.name="lars"\', "optim.dense.lr=8.0"]\n'
    )
    from ctrscale.bench.auc_vs_batch import plan_sweep
    from ctrscale.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "auc-vs-batch", "--config", str(preset), "--out", str(tmp_path / "out"),
         "--rules", "cowclip+lars", "--batch-sizes", "512"]
    )  # fmt: skip
    (config,) = plan_sweep(args).configs.values()
    assert (config.optim.dense.name, config.optim.dense.lr) == ("lars", 8.0)


@pytest.mark.parametrize("name", ["bogus", "cowclip+rmsprop", "cowclip+", "+lamb", "Cowclip"])
def test_unknown_rules_are_refused_naming_the_valid_ones(name):
    with pytest.raises(CtrscaleError) as raised:
        parse_rule(name)
    message = str(raised.value)
    assert repr(name) in message
    for valid in ("none", "linear", "sqrt", "cowclip", "adam", "lamb", "lars"):
        assert valid in message


def test_cli_refuses_an_unknown_rule_before_doing_any_work(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(bench_args(out, "--rules", "cowclip", "cowclip+adagrad")) == 2  # bad input
    error = capsys.readouterr().err
    assert "unknown rule 'cowclip+adagrad'" in error
    assert "none, linear, sqrt, cowclip" in error and "lamb, lars" in error
    assert not (out / "data").exists() and not (out / "runs").exists()


def test_cli_refuses_a_set_of_what_each_run_sets_itself(tmp_path, capsys):
    assert cli.main(bench_args(tmp_path / "sweep", "--set", "data.batch_size=4096")) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_an_unknown_bench_key_is_an_error_naming_it(tmp_path, capsys):
    preset = tmp_path / "preset.toml"
    preset.write_text(QUICK.read_text().replace("seeds = [0]", "seed = [0]"))
    args = ["bench", "auc-vs-batch", "--config", str(preset), "--out", str(tmp_path / "sweep")]
    assert cli.main(args) == 2
    assert "bench.seed" in capsys.readouterr().err


def test_mean_and_sample_std_over_seeds():
    assert mean_std([0.70, 0.72]) == pytest.approx((0.71, math.sqrt(2) * 0.01))  # n - 1
    assert mean_std([0.7]) == (0.7, None)  # one seed: the spread is unknown, not zero
    assert mean_std([]) == (None, None)


def test_summary_groups_runs_by_batch_size_and_rule():
    def run(batch_size, rule, seed, auc):
        return {
            "batch_size": batch_size, "rule": rule, "seed": seed, "auc": auc, "logloss": 0.45,
            "bayes_auc": 0.8, "bayes_auc_gap": None if auc is None else 0.8 - auc,
            "steps": 10, "train_rows_per_s": 1000.0, "wall_seconds": None,
        }  # fmt: skip

    runs = [
        run(2048, "none", 0, 0.74),
        run(1024, "cowclip", 1, 0.76),
        run(1024, "cowclip", 0, 0.78),
        run(2048, "none", 1, None),  # a diverged run's AUC is missing, not averaged as NaN
    ]
    summary = summarize(runs)
    assert [(s["batch_size"], s["rule"]) for s in summary] == [(1024, "cowclip"), (2048, "none")]
    cowclip, none = summary
    assert cowclip["seeds"] == [0, 1] and cowclip["auc_mean"] == pytest.approx(0.77)
    assert cowclip["auc_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert none["auc_mean"] == pytest.approx(0.74) and none["auc_std"] is None
    assert none["wall_seconds_mean"] is None


def test_every_cell_is_compared_with_the_best_base_result_of_the_whole_sweep():
    """A method that holds its own weak ×1 baseline has not closed the gap: the differences
    are to the best ×1 AUC over every method, overall and per frequency bucket."""

    def cell(batch_size, rule, auc, rare):
        return {
            "batch_size": batch_size, "rule": rule, "seed": 0, "auc": auc, "logloss": 0.45,
            "bayes_auc": 0.8, "bayes_auc_gap": 0.8 - auc, "steps": 10,
            "train_rows_per_s": 1.0, "wall_seconds": 1.0, "buckets": {"<5": rare},
        }  # fmt: skip

    summary = summarize(
        [
            cell(128, "lazy", 0.770, 0.70),  # the best ×1
            cell(128, "dense", 0.760, 0.72),  # a weaker ×1 baseline, but the best rare rows
            cell(1024, "lazy", 0.765, 0.69),
            cell(1024, "dense", 0.760, 0.71),  # holds its own baseline exactly
        ]
    )
    assert best_base(summary) == (pytest.approx(0.770), "lazy")
    text = markdown_table(summary, ["lazy", "dense"], [128, 1024], 128)
    differences = text.split("Difference to the best ×1 result")[1].split("Change from")[0]
    assert "| 1,024 | -0.50 | -1.00 |" in differences
    assert "| 1,024 | -0.50 | +0.00 |" in text  # against each method's own ×1
    assert "| 1,024 | 69.00 (-3.00) | 71.00 (-1.00) |" in text  # the rare bucket's best is dense


def test_second_invocation_skips_finished_runs_and_reruns_a_crashed_one(tmp_path):
    """Two short runs (one with a dense-optimizer variant, both at once), then the same command
    again: nothing retrains; after one run loses its metrics.json (as if killed) only it does."""
    out = tmp_path / "sweep"
    args = bench_args(
        out, "--batch-sizes", "2048", "--rules", "none", "sqrt+lamb", "--set", "train.epochs=1"
    )
    first = run_ctrscale([*args, "--jobs", "2"])
    assert first.stdout.count("training …") == 2
    rows, results = read_results(out)
    assert [(r["rule"], r["scaling_rule"], r["dense_optimizer"]) for r in rows] == [
        ("none", "none", "adam"),
        ("sqrt+lamb", "sqrt", "lamb"),
    ]
    metrics = {r["rule"]: out / r["run_dir"] / "metrics.json" for r in rows}
    stamps = {rule: path.stat().st_mtime_ns for rule, path in metrics.items()}

    second = run_ctrscale(args)
    assert "training …" not in second.stdout
    assert second.stdout.count("finished earlier, skipped") == 2
    assert {rule: path.stat().st_mtime_ns for rule, path in metrics.items()} == stamps
    assert read_results(out)[1]["runs"] == results["runs"]

    metrics["sqrt+lamb"].unlink()
    # --report-only trains nothing and reports the finished run, listing the other as not run.
    reported = run_ctrscale([*args, "--report-only"])
    assert "training …" not in reported.stdout
    rows, results = read_results(out)
    assert [r["rule"] for r in rows] == ["none"] and results["not_run"] == [
        "sqrt+lamb batch 2,048 seed 0"
    ]
    assert "Not run (1): sqrt+lamb batch 2,048 seed 0." in (out / "results.md").read_text()
    third = run_ctrscale(args)
    assert third.stdout.count("training …") == 1 and "sqrt+lamb batch 2,048" in third.stdout
    assert metrics["none"].stat().st_mtime_ns == stamps["none"]
    assert len(read_results(out)[0]) == 2


@pytest.mark.slow
def test_quick_preset_produces_every_run_and_sane_reports(tmp_path):
    out = tmp_path / "quick"
    run_ctrscale(bench_args(out))
    csv_rows, results = read_results(out)
    batch_sizes, rules = results["batch_sizes"], results["rules"]
    assert rules == ["none", "sqrt", "linear", "cowclip"] and len(batch_sizes) == 3
    assert results["failed"] == []
    cells = {(int(r["batch_size"]), r["rule"]) for r in csv_rows}
    assert cells == {(b, r) for b in batch_sizes for r in rules} and len(csv_rows) == len(cells)
    assert_csv_matches_json(csv_rows, results["runs"])

    train_rows = 54_000  # 60,000 generated, about 10% held out (a hash split)
    for run in results["runs"]:
        assert 0.5 < run["auc"] <= 1.0
        assert run["auc"] <= run["bayes_auc"] + BAYES_TOLERANCE
        assert run["bayes_auc_gap"] == pytest.approx(run["bayes_auc"] - run["auc"])
        assert run["steps"] == pytest.approx(2 * train_rows / run["batch_size"], rel=0.03)
        assert run["scale"] == run["batch_size"] / batch_sizes[0]
        assert run["wall_seconds"] > 0 and run["train_rows_per_s"] > 0
    bayes = {run["bayes_auc"] for run in results["runs"]}
    assert len(bayes) == 1  # every run is scored on the same test rows

    table = (out / "results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| batch | × base"))
    assert [cell.strip() for cell in header.strip("|").split("|")][3:] == [*rules, "Bayes AUC"]
    for batch_size in batch_sizes:
        assert any(line.startswith(f"| {batch_size:,} | ×") for line in table)
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    # Every cell against the best ×1 result of the whole sweep, and per frequency bucket.
    text = "\n".join(table)
    assert "Difference to the best ×1 result" in text
    for label in ("<5", "5–99", "≥100"):
        assert f"rarest id was seen {label} times" in text
        assert all(label in run["buckets"] for run in results["runs"])
    for extra in ("results-buckets.png", "results-time.png"):
        assert (out / extra).read_bytes().startswith(PNG_SIGNATURE)


def test_rules_that_coincide_at_the_base_batch_train_once():
    """At s = 1 every rule leaves the values as they are: with the warm-up set explicitly,
    none, sqrt and linear at the base batch are one run; other batch sizes stay apart."""
    from ctrscale.bench.auc_vs_batch import Cell, same_runs
    from ctrscale.config import load_config

    variants = [parse_rule(name) for name in ("none", "sqrt", "linear", "cowclip")]
    cells = [Cell(batch, variant, 0) for batch in (256, 512) for variant in variants]
    settings = ["optim.schedule.base_batch_size=256", "optim.schedule.warmup_fraction=0.1"]

    def config(cell):
        return load_config(None, [*settings, *cell.overrides()])

    twins = same_runs(cells, {cell: config(cell) for cell in cells})
    none, sqrt, linear = cells[:3]
    assert twins == {sqrt: none, linear: none}  # cowclip clips: another run
    without_warmup = {cell: load_config(None, cell.overrides()) for cell in cells}
    assert same_runs(cells, without_warmup) == {}  # the rules' own warm-ups differ


def test_a_finished_run_is_matched_by_its_settings_not_the_text_of_its_config(tmp_path):
    """A field ctrscale gained since a long sweep started (written at its default) keeps the
    sweep's finished runs; a changed setting is refused."""
    from ctrscale.bench.auc_vs_batch import Cell, prepare_run_dir
    from ctrscale.config import load_config

    config = load_config(None, ["data.batch_size=512"])
    cell = Cell(512, parse_rule("none"), 0)
    path = prepare_run_dir(cell, config, tmp_path)
    older = path.read_text().replace("shard_count = 1\n", "")  # as written before the field
    assert older != path.read_text()
    path.write_text(older)
    assert prepare_run_dir(cell, config, tmp_path).read_text() == older  # kept as it was
    changed = load_config(None, ["data.batch_size=512", "optim.dense.lr=0.5"])
    with pytest.raises(CtrscaleError, match="was run with another config"):
        prepare_run_dir(cell, changed, tmp_path)
    # Where the run reports is not what it computes: a resumed sweep's tracking applies.
    tracked = load_config(None, ["data.batch_size=512", 'tracking.mlflow_uri="http://mlflow:5000"'])
    assert load_config(prepare_run_dir(cell, tracked, tmp_path)) == tracked


def test_a_preset_modifier_whose_name_holds_a_plus_is_refused_naming_it(tmp_path, capsys):
    preset = tmp_path / "preset.toml"
    preset.write_text(QUICK.read_text() + '\n[bench.modifiers]\n"a+b" = ["optim.dense.lr=1.0"]\n')
    assert cli.main(["bench", "auc-vs-batch", "--config", str(preset), "--out",
                     str(tmp_path / "out")]) == 2  # fmt: skip
    assert "bench.modifiers.'a+b'" in capsys.readouterr().err
