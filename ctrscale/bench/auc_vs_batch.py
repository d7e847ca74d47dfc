"""`ctrscale bench auc-vs-batch`: test AUC of one model, data set and epoch budget at every
batch size × scaling rule × seed, as a CSV/JSON of every run, a Markdown table and a plot.

A rule is a scaling rule of `optim.schedule.rule`, optionally with a dense optimizer:
`cowclip+lamb` runs rule `cowclip` with `optim.dense.name = "lamb"`. Every run is
`ctrscale train` in a child process of its own, not `train()` in this one: a run that crashes
or runs out of memory costs its cell only, each run starts from a clean process (process group,
RNG and allocator state, the memory of its tables), and the run directory is exactly what a
user's own `ctrscale train` writes.

The preset is a ctrscale config TOML plus an optional `[bench]` table (batch sizes, rules,
seeds, and `[bench.synthetic]`: synthetic data to generate once). Layout of `--out`:

    preset.toml                       the preset without [bench]: the config every run starts from
    data/                             the [bench.synthetic] data, unless its `dir` says elsewhere
    runs/<rule>/batch-<B>/seed-<S>/   one `ctrscale train --out` each; its metrics.json = done
    results.csv, results.json         one row per finished run
    results.md, results.png           mean ± std over seeds per batch size and rule

Resumable: a run whose metrics.json exists is skipped, an interrupted one continues from its
checkpoint (`--resume`) or starts again; the reports are rewritten after every run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ctrscale.bench.methods import RuleVariant, parse_rule
from ctrscale.bench.report import markdown_table, plot, summarize, write_csv
from ctrscale.choices import ScalingRule
from ctrscale.config import (
    BenchTable,
    Config,
    SyntheticData,
    config_to_toml,
    load_config,
    read_toml,
)
from ctrscale.data.schema import METADATA_FILE, read_metadata
from ctrscale.errors import CtrscaleError
from ctrscale.files import finite_or_none
from ctrscale.train.tracking import MlflowSink

DEFAULT_MULTIPLIERS = tuple(2**k for k in range(8))  # base ×1 … ×128, as in the CowClip paper
# Config keys every run sets itself: a --set of one would be silently overwritten.
PER_RUN_KEYS = {
    "data.batch_size": "--batch-sizes",
    "optim.schedule.rule": "--rules",
    "optim.cowclip.mode": "--rules",
    "train.seed": "--seeds",
}


@dataclass(frozen=True)
class Cell:
    """One training run of the sweep."""

    batch_size: int
    variant: RuleVariant
    seed: int

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.variant.name / f"batch-{self.batch_size}" / f"seed-{self.seed}"

    def overrides(self) -> list[str]:
        return [
            f"data.batch_size={self.batch_size}",
            f"train.seed={self.seed}",
            *self.variant.overrides(),
        ]

    def label(self) -> str:
        return f"{self.variant.name} batch {self.batch_size:,} seed {self.seed}"


@dataclass(frozen=True)
class Sweep:
    cells: list[Cell]
    configs: dict[Cell, Config]
    bench: BenchTable
    preset_path: Path  # the preset without [bench], inside --out
    same_as: dict[Cell, Cell]  # cells trained by another cell's run (`same_runs`)


def read_preset(path: str | Path) -> tuple[BenchTable, dict[str, Any]]:
    """The `[bench]` table and the rest of the preset: the config every run starts from,
    without the sweep's own settings (a run's config.toml then shows only what it ran)."""
    tree = read_toml(path)
    bench = load_config(path).bench  # validates the whole preset, [bench] included
    tree.pop("bench", None)
    return bench, tree


def plan_sweep(args) -> Sweep:
    """Every run's validated config, before anything is generated or trained."""
    if args.jobs < 1:
        raise CtrscaleError(f"--jobs must be at least 1, got {args.jobs}")
    out = Path(args.out)
    bench, tree = read_preset(args.config) if args.config else (BenchTable(), {})
    for override in args.overrides:
        key = override.partition("=")[0].strip()
        if key in PER_RUN_KEYS:
            raise CtrscaleError(f"--set {key}: set per run by the bench; use {PER_RUN_KEYS[key]}")
    variants = [parse_rule(name, bench.modifiers) for name in args.rules or bench.rules]
    seeds = args.seeds or bench.seeds
    data_overrides = []
    if bench.synthetic is not None:
        if tree.get("data", {}).get("train"):
            raise CtrscaleError(
                "the preset sets both data.train and [bench.synthetic]: keep one of them"
            )
        data_overrides = [f"data.train=[{json.dumps(str(synthetic_dir(bench.synthetic, out)))}]"]

    out.mkdir(parents=True, exist_ok=True)
    preset_path = out / "preset.toml"
    write_if_changed(preset_path, tomli_w.dumps(tree))
    base = load_config(preset_path, [*data_overrides, *args.overrides])
    if not base.data.train:
        raise CtrscaleError("no data: set data.train in the preset, or add [bench.synthetic]")
    batch_sizes = args.batch_sizes or bench.batch_sizes or default_batch_sizes(base)
    cells = [
        Cell(batch_size, variant, seed)
        for seed in seeds
        for batch_size in sorted(set(batch_sizes))
        for variant in variants
    ]
    configs = {
        cell: load_config(preset_path, [*data_overrides, *args.overrides, *cell.overrides()])
        for cell in cells
    }
    return Sweep(cells, configs, bench, preset_path, same_runs(cells, configs))


def same_runs(cells: list[Cell], configs: dict[Cell, Config]) -> dict[Cell, Cell]:
    """Cells that would train exactly what an earlier cell trains, mapped to it: at the base
    batch size (s = 1) every scaling rule leaves the values as they are, so rules that differ
    only there — with the warm-up set explicitly — are one run, trained once."""
    first: dict[str, Cell] = {}
    twins = {}
    for cell in cells:
        config = configs[cell]
        schedule = config.optim.schedule
        explicit_warmup = schedule.warmup_steps is not None or schedule.warmup_fraction is not None
        if config.data.batch_size == schedule.base_batch_size and explicit_warmup:
            config = config.model_copy(deep=True)
            config.optim.schedule.rule = ScalingRule.NONE
        key = config_to_toml(config)
        if key in first:
            twins[cell] = first[key]
        else:
            first[key] = cell
    return twins


def default_batch_sizes(config: Config) -> list[int]:
    return [config.optim.schedule.base_batch_size * m for m in DEFAULT_MULTIPLIERS]


def synthetic_dir(spec: SyntheticData, out: Path) -> Path:
    return Path(spec.dir) if spec.dir else out / "data"


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def ensure_synthetic_data(spec: SyntheticData, directory: Path) -> None:
    """Generate the data once; reuse it when it is exactly this spec, refuse anything else."""
    from ctrscale.data.synth import generate

    expected = {f"day={day}": spec.rows for day in range(spec.days)}
    if (directory / METADATA_FILE).exists():
        metadata = read_metadata(directory)
        found = {
            split: entry["rows"] for split, entry in metadata["splits"].items() if split != "all"
        }
        same = (
            metadata.get("seed") == spec.seed
            and metadata.get("cardinality_scale") == spec.cardinality_scale
            and metadata.get("format") == "parquet"
            and found == expected
        )
        if not same:
            raise CtrscaleError(
                f"{directory} holds other data than [bench.synthetic] asks for ({spec.days} × "
                f"{spec.rows:,} rows, seed {spec.seed}, cardinality scale "
                f"{spec.cardinality_scale}): delete it, or set [bench.synthetic] dir elsewhere"
            )
        print(f"reusing synthetic data in {directory}", flush=True)
        return
    print(f"generating synthetic data into {directory} …", flush=True)
    generate(
        directory,
        rows_per_day=spec.rows,
        days=spec.days,
        seed=spec.seed,
        cardinality_scale=spec.cardinality_scale,
    )


def say(line: str) -> None:
    """One progress line in one write, so lines of runs trained at once never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def prepare_run_dir(cell: Cell, config: Config, run_dir: Path) -> Path:
    """The run's config file; a finished or started run with other settings is an error. The
    settings are compared, not the text: a field added to ctrscale since (at its default)
    does not orphan the finished runs of a long sweep."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.toml"
    if path.exists():
        try:
            recorded = load_config(path)
        except CtrscaleError:
            recorded = None
        # Where a run reports (MLflow) does not change what it computes: a started run
        # continues with this sweep's tracking (train --resume accepts that change).
        if recorded is None or recorded.model_copy(update={"tracking": config.tracking}) != config:
            raise CtrscaleError(
                f"{run_dir} was run with another config than this sweep's ({cell.label()}); "
                "choose another --out, or delete that run directory to rerun it"
            )
        if recorded == config:
            return path
    path.write_text(config_to_toml(config))
    return path


def run_cell(
    cell: Cell, config_path: Path, run_dir: Path, keep_checkpoints: bool, tracking: dict[str, str]
) -> bool:
    """Train one cell in a child process (output in its train.log); True if it finished.
    `tracking`: environment that makes its MLflow run a child of the sweep's."""
    from ctrscale.distributed.context import child_environment
    from ctrscale.jobs.launch import train_command

    command = train_command(config_path, run_dir)
    say(f"{cell.label()}: training …")
    env = {**child_environment(), **tracking}
    started = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not is_finished(run_dir):
        return False
    timing = {"wall_seconds": time.perf_counter() - started, "resumed": "--resume" in command}
    (run_dir / "timing.json").write_text(json.dumps(timing) + "\n")
    if not keep_checkpoints:
        # A finished run needs none, and a sweep would otherwise keep one model per cell.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return True


def result_row(cell: Cell, config: Config, run_dir: Path, out: Path) -> dict[str, Any]:
    """One CSV/JSON row from a finished run's metrics.json (and timing.json)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    hp = metrics["hyperparameters"]
    row = {
        "batch_size": cell.batch_size,
        "scale": hp["scale"],
        "rule": cell.variant.name,
        "scaling_rule": config.optim.schedule.rule,
        "dense_optimizer": config.optim.dense.name,
        "semantics": config.optim.embedding.semantics,
        "seed": cell.seed,
        "embedding_lr": hp["embedding_lr"],
        "embedding_l2": hp["embedding_l2"],
        "dense_lr": hp["dense_lr"],
        "dense_warmup_steps": hp["dense_warmup_steps"],
        "cowclip": hp["embedding"]["cowclip"]["mode"],
        "auc": metrics["auc"],
        "logloss": metrics["logloss"],
        "bayes_auc": metrics.get("bayes_auc"),
        "bayes_auc_gap": metrics.get("bayes_auc_gap"),
        "steps": metrics["steps"],
        "epochs": metrics["epochs"],
        "train_rows_per_s": metrics["rows_per_s"],
        "wall_seconds": timing.get("wall_seconds"),
        "run_dir": str(run_dir.relative_to(out)),
        "buckets": {label: b["auc"] for label, b in (metrics.get("buckets") or {}).items()},
    }
    return finite_or_none(row)


def write_reports(
    out: Path,
    sweep: Sweep,
    rows: list[dict[str, Any]],
    failed: list[str],
    not_run: list[str] = (),
) -> str:
    rules = list(dict.fromkeys(cell.variant.name for cell in sweep.cells))
    batch_sizes = sorted({cell.batch_size for cell in sweep.cells})
    base = sweep.configs[sweep.cells[0]].optim.schedule.base_batch_size
    summary = summarize(rows)
    payload = {
        "command": sys.argv,
        "preset": str(sweep.preset_path),
        "batch_sizes": batch_sizes,
        "base_batch_size": base,
        "rules": rules,
        "seeds": sorted({cell.seed for cell in sweep.cells}),
        "synthetic": None if sweep.bench.synthetic is None else sweep.bench.synthetic.model_dump(),
        "runs": rows,
        "summary": summary,
        "failed": failed,
        "not_run": list(not_run),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_csv(out / "results.csv", rows)
    table = markdown_table(summary, rules, batch_sizes, base)
    if not_run:
        table += f"\nNot run ({len(not_run)}): {', '.join(not_run)}.\n"
    (out / "results.md").write_text(table)
    plot(out / "results.png", summary, rules, batch_sizes, len(payload["seeds"]))
    return table


def run_cli(args) -> int:
    sweep = plan_sweep(args)
    out = Path(args.out)
    if (synthetic := sweep.bench.synthetic) is not None:
        ensure_synthetic_data(synthetic, synthetic_dir(synthetic, out))
    rows: dict[Cell, dict[str, Any]] = {}
    failed: list[Cell] = []

    not_run: list[Cell] = []

    def report(cell: Cell, message: str) -> None:
        done = len(rows) + len(failed)
        say(f"[{done}/{len(sweep.cells)}] {cell.label()}: {message}")
        ordered = [rows[c] for c in sweep.cells if c in rows]
        skipped = [c.label() for c in not_run]
        write_reports(out, sweep, ordered, [c.label() for c in failed], skipped)

    # Every run directory is checked against its config before any run starts.
    config_paths = {
        cell: prepare_run_dir(cell, sweep.configs[cell], cell.directory(out))
        for cell in sweep.cells
        if cell not in sweep.same_as
    }
    to_train = []
    for cell in sweep.cells:
        if cell in sweep.same_as:
            continue
        if is_finished(cell.directory(out)):
            rows[cell] = result_row(cell, sweep.configs[cell], cell.directory(out), out)
            report(cell, "finished earlier, skipped")
        else:
            to_train.append(cell)
    if args.report_only:
        not_run.extend(to_train)
        not_run.extend(c for c, original in sweep.same_as.items() if original in to_train)
        to_train = []
        if rows:
            last = next(reversed(rows))
            report(last, "reports written from the finished runs")
    parent = sweep_run(sweep, out, args) if to_train or rows else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {}
        for cell in to_train:
            tracking = parent.child_environment(cell.label()) if parent is not None else {}
            future = pool.submit(
                run_cell, cell, config_paths[cell], cell.directory(out), args.keep_checkpoints,
                tracking,
            )  # fmt: skip
            running[future] = cell
        for future in as_completed(running):
            cell = running[future]
            if future.result():
                rows[cell] = result_row(cell, sweep.configs[cell], cell.directory(out), out)
                report(cell, describe(rows[cell]))
            else:
                failed.append(cell)
                report(cell, f"FAILED, see {cell.directory(out) / 'train.log'}")
    for cell, original in sweep.same_as.items():
        if original in rows:
            rows[cell] = result_row(cell, sweep.configs[cell], original.directory(out), out)
            report(cell, f"the same run as {original.label()}")
    if parent is not None:
        reports = [f"results.{suffix}" for suffix in ("md", "csv", "json", "png")]
        parent.finish("FAILED" if failed else "FINISHED", reports)
    if not rows:
        print(f"no finished runs in {out}: nothing to report", file=sys.stderr)
        return 1 if failed else 0
    print((out / "results.md").read_text())
    print(f"results in {out}/results.{{csv,json,md,png}}")
    if failed:
        print(f"{len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def sweep_run(sweep: Sweep, out: Path, args) -> MlflowSink | None:
    """The sweep's MLflow run (parent of every cell's), when the preset sets
    tracking.mlflow_uri; a resumed sweep continues it."""
    tracking = next(iter(sweep.configs.values())).tracking
    if not tracking.mlflow_uri:
        return None
    params = {
        "preset": str(args.config),
        "batch_sizes": sorted({cell.batch_size for cell in sweep.cells}),
        "rules": list(dict.fromkeys(cell.variant.name for cell in sweep.cells)),
        "seeds": sorted({cell.seed for cell in sweep.cells}),
    }
    return MlflowSink(tracking.model_copy(update={"run_name": f"sweep {out.name}"}), out, params)


def describe(row: dict[str, Any]) -> str:
    bayes = "" if row["bayes_auc"] is None else f" (Bayes {row['bayes_auc']:.5f})"
    wall = "" if row["wall_seconds"] is None else f", {row['wall_seconds']:.0f} s"
    auc = "n/a" if row["auc"] is None else f"{row['auc']:.5f}"
    return f"AUC {auc}{bayes}, {row['steps']} steps{wall}"
