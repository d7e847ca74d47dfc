"""`ctrscale bench loader`: rows/s of the Parquet → `Batch` loader alone.

Measured side by side in one run on the same files: pyarrow decoding the row groups with
nothing else (the ceiling any Parquet loader here can reach), then the loader at each batch
size, shuffled (as training reads) and in file order (as evaluation reads). Each loader runs
three epochs: the first pays one-time costs (first touch of the shuffle buffer's pages); the
best of the next two is the steady state a long training run sees. The page cache is warmed
first, so the figures are for data on local disk that the OS has cached, not for cold reads.

Then the job's aggregate rate with N loader processes (`--processes`, ranks of one world, the
largest batch, shuffled), replicated (every rank decodes the whole stream) and sharded (each
its share, `data.decode`): all rows the ranks yield over their steady epochs, divided by the
slowest rank's time. Processes beyond the machine's cores share them, which the report says.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.loader import ParquetBatchLoader, resolve_parquet_files
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_json_atomic

TARGET_ROWS_PER_S = 1_000_000
ROW_GROUP_ROWS = 131_072  # what `ctrscale prepare` writes
# Epochs after the first; the best is reported, as other load on the machine only slows.
STEADY_EPOCHS = 2


def write_random_dataset(out_dir: Path, rows: int, seed: int = 0) -> None:
    """Uniformly random valid rows in the prepared schema, for when synth is unavailable."""
    rng = np.random.default_rng(seed)
    sizes = {name: max(1, n // 100) for name, n in schema.CRITEO_KAGGLE_CARDINALITIES.items()}
    columns: dict[str, Any] = {schema.LABEL: rng.integers(0, 2, rows).astype(np.int8)}
    for name in schema.DENSE_FEATURES:
        columns[name] = rng.random(rows, dtype=np.float32)
    for name in schema.SPARSE_FEATURES:
        columns[name] = rng.integers(0, sizes[name], rows)
    table = pa.Table.from_pydict(columns, schema=schema.PARQUET_SCHEMA)
    (out_dir / "day=0").mkdir(parents=True)
    pq.write_table(table, out_dir / "day=0/part-00000.parquet", row_group_size=ROW_GROUP_ROWS)
    write_json_atomic(out_dir / schema.METADATA_FILE, {"table_sizes": sizes})


def make_dataset(out_dir: Path, rows: int) -> str:
    """A synthetic dataset; says which generator made it."""
    try:
        from ctrscale.data.synth import generate
    except ImportError:
        write_random_dataset(out_dir, rows)
        return "uniformly random rows written with pyarrow (ctrscale.data.synth not available)"
    generate(out_dir, rows_per_day=rows, days=1, seed=0)
    return "ctrscale.data.synth.generate(rows_per_day=ROWS, days=1, seed=0)"


def decode_rows_per_s(data: str) -> float:
    """pyarrow alone: every row group's loader columns decoded, results dropped."""
    files = resolve_parquet_files([data])
    columns = list(schema.RAW_COLUMNS)
    rows = 0
    started = time.perf_counter()
    for path in files:
        handle = pq.ParquetFile(path)
        for index in range(handle.num_row_groups):
            rows += handle.read_row_group(index, columns=columns).num_rows
    return rows / (time.perf_counter() - started)


def epoch_rows_per_s(loader: ParquetBatchLoader) -> float:
    rows = 0
    started = time.perf_counter()
    for batch in loader:
        rows += batch.labels.numel()
    return rows / (time.perf_counter() - started)


def measure(data: str, batch_sizes: list[int]) -> dict[str, Any]:
    decode_rows_per_s(data)  # warm the page cache
    ceiling = decode_rows_per_s(data)
    runs = []
    for batch_size in batch_sizes:
        for shuffle in (True, False):
            loader = ParquetBatchLoader([data], batch_size, shuffle=shuffle, drop_last=False)
            first = epoch_rows_per_s(loader)
            steady = max(epoch_rows_per_s(loader) for _ in range(STEADY_EPOCHS))
            runs.append(
                {
                    "batch_size": batch_size,
                    "order": "shuffled" if shuffle else "in order",
                    "first_epoch_rows_per_s": first,
                    "rows_per_s": steady,
                    "fraction_of_decode": steady / ceiling,
                }
            )
    return {"rows": loader.num_rows, "decode_rows_per_s": ceiling, "runs": runs}


def _rank_worker(
    data: str, batch_size: int, rank: int, world_size: int, layouts: list[bool], start, results
) -> None:
    """One rank's loader in each layout (sharded or not): a first epoch, then (with every rank
    at once) the steady epochs."""
    for sharded in layouts:
        loader = ParquetBatchLoader(
            [data], batch_size, rank=rank, world_size=world_size, sharded_decode=sharded,
            drop_last=False,
        )  # fmt: skip
        epoch_rows_per_s(loader)
        start.wait()
        rows, started = 0, time.perf_counter()
        for _ in range(STEADY_EPOCHS):
            for batch in loader:
                rows += batch.labels.numel()
        results.put((sharded, rows, time.perf_counter() - started))


def aggregate_rows_per_s(
    data: str, batch_size: int, processes: int, layouts: list[bool]
) -> dict[bool, float]:
    """Rows/s of `processes` ranks reading one stream together in each layout (see the module
    docstring): the same processes measure every layout, one after the other."""
    # spawn, not fork: a forked child would inherit this process's threads and buffers.
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_rank_worker,
            args=(data, batch_size, rank, processes, layouts, start, results),
        )
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    expected = processes * len(layouts)
    finished: list[tuple[bool, int, float]] = []
    try:
        while len(finished) < expected:
            try:
                finished.append(results.get(timeout=1.0))
            except queue.Empty:
                failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if failed:
                    raise CtrscaleError(
                        f"a loader process of {processes} exited with code {failed[0]} (its "
                        "error is printed above)"
                    ) from None
    finally:
        for worker in workers:
            if len(finished) < expected:
                worker.terminate()  # the others wait at the barrier for the one that failed
            worker.join()
    return {
        sharded: sum(r for s, r, _ in finished if s == sharded)
        / max(t for s, _, t in finished if s == sharded)
        for sharded in layouts
    }


def measure_processes(data: str, batch_size: int, processes: list[int]) -> list[dict[str, Any]]:
    runs = []
    for count in processes:
        layouts = [False, True] if count > 1 else [False]
        rates = aggregate_rows_per_s(data, batch_size, count, layouts)
        for sharded in layouts:
            runs.append(
                {
                    "processes": count,
                    "decode": "sharded" if sharded else "replicated",
                    "batch_size": batch_size,
                    "rows_per_s": rates[sharded],
                }
            )
    single = next((r["rows_per_s"] for r in runs if r["processes"] == 1), None)
    for run in runs:
        run["over_one_process"] = run["rows_per_s"] / single if single else None
    return runs


def report(results: dict[str, Any]) -> str:
    lines = [
        f"{results['rows']:,} rows; pyarrow decode alone: {results['decode_rows_per_s']:,.0f} "
        "rows/s",
        f"{'batch':>9} {'order':>9} {'1st epoch rows/s':>17} {'rows/s':>11} {'÷ decode':>9}",
    ]
    for run in results["runs"]:
        lines.append(
            f"{run['batch_size']:>9,} {run['order']:>9} {run['first_epoch_rows_per_s']:>17,.0f} "
            f"{run['rows_per_s']:>11,.0f} {run['fraction_of_decode']:>9.2f}"
        )
    slowest = min(run["rows_per_s"] for run in results["runs"])
    verdict = "met" if slowest >= TARGET_ROWS_PER_S else "NOT met"
    lines.append(f"target ≥ {TARGET_ROWS_PER_S:,} rows/s per process: {verdict}")
    if results.get("processes"):
        lines.append(
            f"aggregate of N processes ({results['cpu_count']} CPU cores here), batch "
            f"{results['processes'][0]['batch_size']:,}, shuffled:"
        )
        lines.append(f"{'N':>3} {'decode':>11} {'rows/s':>11} {'× 1 process':>12}")
        for run in results["processes"]:
            ratio = run["over_one_process"]
            lines.append(
                f"{run['processes']:>3} {run['decode']:>11} {run['rows_per_s']:>11,.0f} "
                + (f"{ratio:>12.2f}" if ratio is not None else f"{'—':>12}")
            )
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    largest = max(args.batch_sizes)
    unusable = [n for n in args.processes if n < 1 or largest % n]
    if unusable:
        raise CtrscaleError(
            f"--processes {unusable[0]}: each must be at least 1 and divide the largest "
            f"--batch-sizes value ({largest:,}), which the ranks split evenly"
        )
    with tempfile.TemporaryDirectory(prefix="ctrscale-bench-loader-") as tmp:
        if args.data is None:
            data = str(Path(tmp) / "data")
            source = make_dataset(Path(data), args.rows).replace("ROWS", f"{args.rows:,}")
            print(f"dataset: {source}")
        else:
            data, source = args.data, args.data
        results = measure(data, args.batch_sizes)
        results["cpu_count"] = os.cpu_count()
        results["processes"] = measure_processes(data, max(args.batch_sizes), args.processes)
    results["data"] = source
    print(report(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results)
    return 0
