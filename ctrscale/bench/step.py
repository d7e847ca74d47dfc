"""`ctrscale bench step`: training-step throughput and peak memory of a model, per batch size,
as a fraction of this machine's compute-bound limit measured in the same run.

The limit is the rows/s the model would reach if every step ran at the matmul FLOP/s that
`torch.mm` attains here, with the model's FLOPs per row of a forward and backward counted by
`torch.utils.flop_counter.FlopCounterMode` (matrix products of every layer: MLPs, DLRM's
pairwise dots, DCNv2's cross layers). Embedding lookups and element-wise work are memory-bound
and not counted, so the fraction is an upper estimate of how well the step uses the cores.
Each batch size runs in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctrscale.config import Config, ModelConfig, build_config, load_config, user_settings
from ctrscale.errors import CtrscaleError

# Alternated rounds of steps after the warm-up, at least; more while under --min-seconds.
MIN_ROUNDS = 5


CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device: CUDA runs kernels asynchronously, so a clock read without this
    times the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    rows: int,
    device: torch.device = CPU,
    width: int = 400,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Best-of FLOP/s of an [rows, width] × [width, width] matmul (a DNN layer) in `dtype` on
    the device the steps run on."""
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, width, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * width * width / best


def train_flops_per_row(config: ModelConfig, rows: int = 64) -> float:
    """FLOPs per row of one forward and backward of an unsharded copy of the model (matrix
    products only; FLOPs are linear in the batch, so a small one gives the exact per-row)."""
    from torchrec import KeyedJaggedTensor

    from ctrscale.data.schema import DENSE_FEATURES, SPARSE_FEATURES
    from ctrscale.models import build_model

    sizes = dict.fromkeys(SPARSE_FEATURES, 8)
    model = build_model(config, sizes, embedding_device=torch.device("cpu"))
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=torch.zeros(rows * len(SPARSE_FEATURES), dtype=torch.int64),
        lengths=torch.ones(rows * len(SPARSE_FEATURES), dtype=torch.int32),
    )
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(rows, len(DENSE_FEATURES)), features).sum().backward()
    return counter.get_total_flops() / rows


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mib(device: torch.device) -> float | None:
    """Peak GPU memory of the process (None on CPU, where RSS is the memory)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _trainer_and_batches(config: Config):
    from ctrscale.data.loader import ParquetBatchLoader
    from ctrscale.distributed.context import init_distributed
    from ctrscale.train.step import build_trainer

    ctx = init_distributed(config.distributed)
    train_loader = ParquetBatchLoader.from_config(
        config.data, "train", ctx.rank, ctx.world_size, seed=config.train.seed
    )
    steps = train_loader.num_batches()
    trainer = build_trainer(
        config, ctx, train_loader.table_sizes, steps_per_epoch=steps, total_steps=steps
    )
    in_memory = [b.to(ctx.device) for b in islice(train_loader, 4)]
    return ctx, trainer, train_loader, in_memory


def measure_one(config: Config, with_loader: bool, min_seconds: float) -> dict[str, Any]:
    """Steps of `config`'s model at `config.data.batch_size` in this process."""
    ctx, trainer, train_loader, in_memory = _trainer_and_batches(config)
    batch_size = config.data.batch_size
    source = cycle(train_loader) if with_loader else cycle(in_memory)

    def run(steps: int) -> float:
        synchronize(ctx.device)
        start = time.perf_counter()
        for index, batch in enumerate(islice(source, steps)):
            trainer.step(batch.to(ctx.device), batch_size, index)
        synchronize(ctx.device)
        return time.perf_counter() - start

    run(3)  # warm-up: allocator, FBGEMM state, thread pools
    steps, seconds = 2, run(2)
    while seconds < min_seconds:
        more = max(2, int(steps * (min_seconds - seconds) / max(seconds, 1e-3)))
        seconds += run(more)
        steps += more
    rows_per_s = steps * batch_size / seconds
    # The limit in the precision the dense tower computes in: bf16 matmuls where it is bf16.
    flops = matmul_flops_per_s(batch_size, ctx.device, dtype=trainer.precision)
    limit = flops / train_flops_per_row(config.model)
    return {
        "batch_size": batch_size,
        "precision": config.train.precision.value,
        "precision_reason": trainer.precision_reason,
        "source": "loader" if with_loader else "memory",
        "steps": steps,
        "seconds": seconds,
        "rows_per_s": rows_per_s,
        "compute_bound_rows_per_s": limit,
        "fraction_of_limit": rows_per_s / limit,
        "peak_rss_mib": peak_rss_mib(),
        "peak_device_mib": peak_device_mib(ctx.device),
    }


def measure_alternated(
    config: Config, variants: dict[str, list[str]], min_seconds: float
) -> dict[str, Any]:
    """Median step time of `config` under each variant (its `--set` overrides): one trainer
    per variant in this process on the same in-memory batches, their steps alternated and the
    order rotated each round.

    One process for all sides, because separate processes differed by up to ±5% in rows/s for
    identical work on this machine, more than the differences measured here.
    """
    trainers, batches = {}, []
    for name, overrides in variants.items():
        variant = build_config(user_settings(None, overrides), base=config)
        ctx, trainers[name], _, batches = _trainer_and_batches(variant)
    batch_size = config.data.batch_size
    times: dict[str, list[float]] = {name: [] for name in trainers}

    def step(name: str, index: int) -> float:
        synchronize(ctx.device)
        start = time.perf_counter()
        trainers[name].step(batches[index % len(batches)].to(ctx.device), batch_size, index)
        synchronize(ctx.device)
        return time.perf_counter() - start

    for index in range(3):  # warm-up
        for name in trainers:
            step(name, index)
    names, rounds = list(trainers), 0
    while rounds < MIN_ROUNDS or sum(map(sum, times.values())) < len(names) * min_seconds:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            times[name].append(step(name, 3 + rounds))
        rounds += 1
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "step_seconds": {name: statistics.median(values) for name, values in times.items()},
        "peak_rss_mib": peak_rss_mib(),
    }


def cowclip_overhead(config: Config, min_seconds: float) -> dict[str, Any]:
    """CowClip off and on, everything else equal (rule `none`: L2 and the embedding optimizer
    run on both sides)."""
    rule = 'optim.schedule.rule="none"'
    variants = {
        "off": [rule, 'optim.cowclip.mode="off"'],
        "on": [rule, 'optim.cowclip.mode="paper"'],
    }
    result = measure_alternated(config, variants, min_seconds)
    seconds = result["step_seconds"]
    return {**result, "cowclip_step_time_overhead": seconds["on"] / seconds["off"] - 1.0}


def method_ratios(config: Config, methods: list[str], min_seconds: float) -> dict[str, Any]:
    """Each method's step time over Adam's (the dense optimizer; transforms on Adam)."""
    from ctrscale.bench.methods import MODIFIERS

    unknown = [m for m in methods if m not in MODIFIERS]
    if unknown:
        raise CtrscaleError(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(MODIFIERS)}"
        )
    variants = {"adam": ['optim.dense.name="adam"']}
    variants |= {m: ['optim.dense.name="adam"', *MODIFIERS[m]] for m in methods}
    result = measure_alternated(config, variants, min_seconds)
    seconds = result["step_seconds"]
    ratios = {m: seconds[m] / seconds["adam"] for m in methods}
    return {**result, "step_time_over_adam": ratios}


def _synthetic_dataset(directory: Path, rows: int) -> Path:
    from ctrscale.data.synth import generate

    generate(directory, rows_per_day=rows, days=1, seed=0)
    return directory


def run_cli(args) -> int:
    if args.one is not None:  # child process: one batch size
        config = load_config(args.config, [*args.overrides, f"data.batch_size={args.one}"])
        if args.cowclip_overhead:
            print(json.dumps(cowclip_overhead(config, args.min_seconds)))
        elif args.methods:
            print(json.dumps(method_ratios(config, args.methods, args.min_seconds)))
        else:
            print(json.dumps(measure_one(config, args.with_loader, args.min_seconds)))
        return 0
    with tempfile.TemporaryDirectory(prefix="ctrscale-bench-") as tmp:
        data = args.data or str(_synthetic_dataset(Path(tmp) / "data", args.rows))
        base = [f"data.train=['{data}']", "data.holdout_fraction=0.0"]
        results = []
        for batch_size in args.batch_sizes:
            for precision in args.precision:
                for with_loader in (False, True) if args.with_loader else (False,):
                    child = [*base, f'train.precision="{precision}"']
                    results.append(_run_child(args, child, batch_size, with_loader))
                    _print_row(results[-1])
        largest = max(args.batch_sizes)
        if args.cowclip_overhead:
            results.append(_cowclip_overheads(args, base, largest))
        if args.methods:
            ratios = _run_child(args, base, largest, extra=["--methods", *args.methods])
            results.append(ratios)
            for method, ratio in ratios["step_time_over_adam"].items():
                print(f"batch {largest:>7} {method:>12}: {ratio:.2f}× Adam's step time", flush=True)
    summary = _summary(results)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": results, **summary}, indent=2) + "\n")
    return 0


def _cowclip_overheads(args, base: list[str], batch_size: int) -> dict[str, Any]:
    """`--repeat` processes' CowClip overheads and their median: a process's ratio varies by a
    few percent from one process to the next (allocator layout, thread placement)."""
    if args.repeat < 1:
        raise CtrscaleError(f"--repeat must be at least 1, got {args.repeat}")
    runs = []
    for _ in range(args.repeat):
        runs.append(_run_child(args, base, batch_size, extra=["--cowclip-overhead"]))
        seconds = runs[-1]["step_seconds"]
        print(
            f"batch {batch_size:>7} CowClip off/on: {seconds['off']:.3f} / {seconds['on']:.3f} "
            f"s per step (median of {runs[-1]['rounds']} alternated steps each): "
            f"{runs[-1]['cowclip_step_time_overhead']:+.1%}",
            flush=True,
        )
    overheads = [run["cowclip_step_time_overhead"] for run in runs]
    middle = sorted(runs, key=lambda run: run["cowclip_step_time_overhead"])[len(runs) // 2]
    return {
        **middle,
        "cowclip_step_time_overhead": statistics.median(overheads),
        "cowclip_step_time_overhead_runs": overheads,
    }


def _run_child(
    args, base: list[str], batch_size: int, with_loader: bool = False, extra: list[str] = ()
) -> dict[str, Any]:
    command = [sys.executable, "-m", "ctrscale", "bench", "step", "--one", str(batch_size)]
    command += ["--min-seconds", str(args.min_seconds)]
    command += ["--config", args.config] if args.config else []
    for override in [*base, *args.overrides]:
        command += ["--set", override]
    command += ["--with-loader"] if with_loader else []
    command += list(extra)
    from ctrscale.distributed.context import child_environment

    env = child_environment()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench step at batch {batch_size} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"batch {r['batch_size']:>7} {r['precision']:>4} {r['source']:>6}: "
        f"{r['rows_per_s']:>12,.0f} rows/s  "
        f"{r['fraction_of_limit']:6.1%} of compute-bound {r['compute_bound_rows_per_s']:,.0f}  "
        f"peak RSS {r['peak_rss_mib']:,.0f} MiB",
        flush=True,
    )


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the runs: the first precision asked for gives the unqualified ones."""
    plain = [r for r in results if "source" in r]
    precisions = list(dict.fromkeys(r["precision"] for r in plain))
    memory = {(r["precision"], r["batch_size"]): r for r in plain if r["source"] == "memory"}
    loader = {(r["precision"], r["batch_size"]): r for r in plain if r["source"] == "loader"}
    first = precisions[0]
    sizes = sorted(b for p, b in memory if p == first)
    smallest, largest = sizes[0], sizes[-1]
    summary: dict[str, Any] = {
        "precision": first,
        "fraction_of_limit_at_largest": memory[first, largest]["fraction_of_limit"],
        "smallest_over_largest_rows_per_s": memory[first, smallest]["rows_per_s"]
        / memory[first, largest]["rows_per_s"],
    }
    if loader:
        summary["loader_over_memory_rows_per_s"] = {
            f"{p} {b}": loader[p, b]["rows_per_s"] / memory[p, b]["rows_per_s"] for p, b in loader
        }
    for precision in precisions[1:]:
        summary[f"{precision}_fraction_of_limit_at_largest"] = memory[precision, largest][
            "fraction_of_limit"
        ]
        summary[f"{precision}_over_{first}_rows_per_s"] = {
            b: memory[precision, b]["rows_per_s"] / memory[first, b]["rows_per_s"] for b in sizes
        }
    for r in results:
        for key in ("cowclip_step_time_overhead", "step_time_over_adam"):
            if key in r:
                summary[key] = r[key]
    return summary
