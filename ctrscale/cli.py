"""The `ctrscale` command line: one entry point, one subcommand per job.

Argument parsing lives here and stays import-light (`ctrscale --help` must not load torch);
each subcommand imports its implementation only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

from ctrscale import __version__
from ctrscale.choices import DenseTransform, IdEncoding, Precision
from ctrscale.errors import CtrscaleError
from ctrscale.runtime import tune_process

Runner = Callable[[argparse.Namespace], int]


def _lazy(target: str) -> Runner:
    """`package.module:function`, imported when the subcommand runs."""
    module_name, function_name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module_name), function_name)(args)

    return run


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="raw Criteo TSV (plain or .gz) → day-partitioned Parquet",
        description="Convert raw Criteo TSV files into the Parquet dataset the loader reads.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="raw TSV files (.gz allowed)")
    p.add_argument("--out", required=True, help="dataset directory (day=N/ partitions inside)")
    p.add_argument(
        "--day",
        type=int,
        action="append",
        help="day number per input, in order (default: N from a name like day_N, else 0, 1, …)",
    )
    p.add_argument(
        "--dense-transform",
        choices=[t.value for t in DenseTransform],
        default=None,
        help="log1p(max(x,0)) [default for a new dataset] or min-max to [0,1] "
        "fitted once and stored; an existing dataset keeps its choice",
    )
    p.add_argument(
        "--ids",
        choices=[e.value for e in IdEncoding],
        default=None,
        help="hash: hex→int mod table size [default for a new dataset]; vocab: "
        "frequency-thresholded vocabulary built once and reused",
    )
    p.add_argument(
        "--table-size",
        type=int,
        default=None,
        help="hash: rows per table (ids mod this; default: Criteo's cardinality "
        "capped at 10,000,000)",
    )
    p.add_argument(
        "--min-count",
        type=int,
        default=None,
        help="vocab: ids seen fewer times map to the OOV id (default 4)",
    )
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.001,
        help="fail when more than this fraction of rows is rejected (default 0.001)",
    )
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=131_072,
        help="rows per Parquet row group (default 131072)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace day partitions that already exist"
    )
    p.add_argument(
        "--short-lines",
        action="store_true",
        help="accept lines with fewer than 40 fields, their missing trailing fields empty (for "
        "files whose trailing tabs were stripped); by default they are rejected as too_few_fields",
    )
    p.set_defaults(run=_lazy("ctrscale.data.prepare:run_cli"))


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="synthetic Criteo-like data from a planted teacher (known Bayes-optimal AUC)",
        description="Generate Criteo-shaped data whose true click probability is known.",
    )
    p.add_argument("--rows", type=int, required=True, help="rows per day")
    p.add_argument("--days", type=int, default=1, help="number of day partitions (default 1)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of teacher and data (default 0)")
    p.add_argument(
        "--format",
        choices=["parquet", "tsv"],
        default="parquet",
        help="parquet (prepared schema) or raw Criteo TSV for `prepare`",
    )
    p.add_argument(
        "--cardinality-scale",
        type=float,
        default=0.01,
        help="multiply Criteo Kaggle's per-feature cardinalities (default 0.01)",
    )
    p.add_argument("--first-day", type=int, default=0, help="number of the first day (default 0)")
    p.add_argument(
        "--overwrite", action="store_true", help="regenerate days that already exist in --out"
    )
    p.set_defaults(run=_lazy("ctrscale.data.synth:run_cli"))


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML preset (see pipelines/); defaults apply without it")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set data.batch_size=8192 (repeatable)",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CTR model on Parquet data (one process, or under torchrun)",
        description="Train with the given config; `torchrun --nproc_per_node N -m ctrscale train` "
        "runs N processes (gloo on CPU, nccl on GPUs).",
    )
    _add_config_arguments(p)
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, with its saved config "
        "(--config/--set may change how it reports, not what it trains)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept changed hyperparameters (they are recorded in config.toml)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration and the hyperparameters at its batch size, "
        "then exit without training",
    )
    p.set_defaults(run=_lazy("ctrscale.train.commands:run_cli"))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="exact AUC/LogLoss of a saved model on the config's eval split",
    )
    _add_config_arguments(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a step-N checkpoint, or a run / checkpoints directory (its latest checkpoint); "
        "the model and data settings are the checkpoint's, --config/--set change the data",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the metrics here as JSON (default: RUN/evaluate-step-N.json for a "
        "checkpoint of a training run; always printed)",
    )
    p.set_defaults(run=_lazy("ctrscale.train.commands:run_evaluate_cli"))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (throughput, AUC versus batch size)")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    loader = kinds.add_parser("loader", help="rows/s of the Parquet → Batch loader alone")
    loader.add_argument(
        "--data", default=None, help="dataset directory (default: generate a synthetic one)"
    )
    loader.add_argument("--batch-sizes", type=int, nargs="+", default=[16_384, 131_072])
    loader.add_argument(
        "--rows", type=int, default=2_000_000, help="rows to generate when --data is not given"
    )
    loader.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="also measure N ranks' aggregate rows/s, replicated and sharded (none: skip)",
    )
    loader.add_argument("--out", default=None, help="also write the results as JSON here")
    loader.set_defaults(run=_lazy("ctrscale.bench.loader:run_cli"))

    step = kinds.add_parser(
        "step",
        help="training-step rows/s and peak memory per batch size vs the compute-bound limit",
    )
    _add_config_arguments(step)
    step.add_argument("--batch-sizes", type=int, nargs="+", default=[1_024, 8_192, 32_768, 131_072])
    step.add_argument(
        "--with-loader",
        action="store_true",
        help="also feed the same steps from the Parquet loader and report the ratio",
    )
    step.add_argument(
        "--cowclip-overhead",
        action="store_true",
        help="also time the largest batch with CowClip off and on and report the step-time ratio",
    )
    step.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the --cowclip-overhead ratio in this many processes and report their "
        "median (default 1)",
    )
    step.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="also time the largest batch with each method (a dense optimizer or transform: "
        "lamb, lambc, novograd, sngm, cblr, mclr, gsnr, extrap, …) against Adam, alternated",
    )
    step.add_argument(
        "--precision",
        nargs="+",
        choices=[p.value for p in Precision if p != Precision.AUTO],
        default=[Precision.FP32.value],
        help="measure each precision (train.precision) with its own compute-bound limit; the "
        "first is the reference of the ratios",
    )
    step.add_argument("--data", default=None, help="dataset (default: a synthetic one)")
    step.add_argument(
        "--rows", type=int, default=1_000_000, help="rows to generate when --data is not given"
    )
    step.add_argument(
        "--min-seconds", type=float, default=10.0, help="time each measurement at least this long"
    )
    step.add_argument("--out", default=None, help="also write the results as JSON here")
    step.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    step.set_defaults(run=_lazy("ctrscale.bench.step:run_cli"))

    auc = kinds.add_parser(
        "auc-vs-batch",
        help="test AUC per batch size × scaling rule × seed: CSV/JSON, Markdown table, plot",
        description="Train the preset's model for the same epochs on the same data at every "
        "batch size with every rule (each run a `ctrscale train` child process) and report "
        "the test AUC, mean ± std over seeds. Rerunning the same command skips finished runs. "
        "The preset may hold a [bench] table (batch_sizes, rules, seeds, [bench.synthetic]).",
    )
    _add_config_arguments(auc)
    auc.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="default: the preset's [bench] batch_sizes, else base batch ×1, ×2 … ×128",
    )
    auc.add_argument(
        "--rules",
        nargs="+",
        default=None,
        metavar="RULE",
        help="none, sqrt, linear, cowclip, each optionally +DENSE optimizer (cowclip+lamb, "
        "cowclip+lars); default: the preset's, else none sqrt linear cowclip",
    )
    auc.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train.seed of each repetition (default: the preset's, else 0)",
    )
    auc.add_argument("--out", default="runs/auc-vs-batch", help="default runs/auc-vs-batch")
    auc.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once (default 1); on CPU give each OMP_NUM_THREADS=cores/jobs",
    )
    auc.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished run's final checkpoint (by default deleted to save disk)",
    )
    auc.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the reports from the runs already finished (the others "
        "are listed as not run)",
    )
    auc.set_defaults(run=_lazy("ctrscale.bench.auc_vs_batch:run_cli"))


def _add_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refresh",
        help="daily refresh: prepare a day, warm-start, train, gate on AUC, publish atomically",
        description="Turn a day of raw logs into a new model and publish it into the registry "
        "only if it is no worse than the published one. Exit codes: 0 published, 1 unexpected "
        "failure, 2 bad input or config, 3 rejected by the AUC gate, 4 registry locked by "
        "another refresh. The last stdout line is a JSON summary.",
    )
    _add_config_arguments(p)
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="the day to refresh, YYYY-MM-DD")
    when.add_argument(
        "--from", dest="date_from", metavar="DATE", help="replay DATE … --to in order (resumable)"
    )
    p.add_argument("--to", dest="date_to", metavar="DATE", help="last day of a --from replay")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="do not warm-start from the published model (the AUC gate still applies)",
    )
    p.set_defaults(run=_lazy("ctrscale.jobs.refresh:run_cli"))


def _add_swap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "swap",
        help="SWAP: large-batch phase, small-batch replicas on disjoint shards, their average",
        description="Stochastic Weight Averaging in Parallel (Gupta et al., ICLR 2020): train "
        "at data.batch_size for swap.phase1_fraction of the run, then swap.replicas runs from "
        "its weights at swap.replica_batch_size on disjoint shards of the rest of the data, "
        "then average them ([swap] in the config) and evaluate. Every phase is a run "
        "directory under --out; rerunning the command resumes. The last stdout line is a "
        "JSON summary.",
    )
    _add_config_arguments(p)
    p.add_argument("--out", required=True, help="directory of the phases' runs")
    p.set_defaults(run=_lazy("ctrscale.jobs.swap:run_cli"))


def _add_selftest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "selftest",
        help="check an installation: train, resume, checkpoint round-trip on generated data",
        description="The first command on a new machine: on generated data, a sharded DeepFM "
        "with CowClip and embedding Adam trains 6 steps, a stop and --resume must end where "
        "the uninterrupted run ended, and evaluate on its checkpoint must give its AUC. Runs "
        'on the configured device (e.g. --set distributed.device="cuda"), in one process or '
        "under torchrun. Prints one JSON line; exit code 0 if every check passed, else 1.",
    )
    _add_config_arguments(p)
    p.add_argument("--dir", default="runs/selftest", help="work directory (replaced)")
    p.set_defaults(run=_lazy("ctrscale.jobs.selftest:run_cli"))


EXIT_CODES = (
    "exit codes: 0 ok; 1 unexpected failure (a crash: rerunning resumes); 2 bad input or "
    "configuration; 3 the refresh's AUC gate rejected the model; 4 another process holds the "
    "lock of the same run, dataset or registry; 5 training diverged (non-finite loss)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrscale",
        description="Large-batch CTR training on TorchRec (CowClip, LAMB/LARS, sharded tables).",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"ctrscale {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' warnings and logs (hidden by default)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_synth(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_refresh(sub)
    _add_swap(sub)
    _add_selftest(sub)
    return parser


def quiet_libraries() -> None:
    """Hide the libraries' warnings and log lines (TorchRec's planner notes, deprecations,
    FBGEMM's C++ logs): they repeat on every run and every rank and bury ctrscale's own
    messages. `--verbose` keeps them."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # both read when torch loads
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torch", "torchrec", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    tune_process()  # before torch loads
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except CtrscaleError as exc:
        print(f"\nctrscale {args.command}: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # never import torch just to exit
            from ctrscale.distributed.context import shutdown_distributed

            shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
