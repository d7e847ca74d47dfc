"""`ctrscale bench loader`: rows/s of the Parquet → `Batch` loader alone, in one process.

Measured side by side in one run on the same files: pyarrow decoding the row groups with
nothing else (the ceiling any Parquet loader here can reach), then the loader at each batch
size, shuffled (as training reads) and in file order (as evaluation reads). Each loader runs
three epochs: the first pays one-time costs (first touch of the shuffle buffer's pages); the
best of the next two is the steady state a long training run sees. The page cache is warmed
first, so the figures are for data on local disk that the OS has cached, not for cold reads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.loader import ParquetBatchLoader, resolve_parquet_files
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
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ctrscale-bench-loader-") as tmp:
        if args.data is None:
            data = str(Path(tmp) / "data")
            source = make_dataset(Path(data), args.rows).replace("ROWS", f"{args.rows:,}")
            print(f"dataset: {source}")
        else:
            data, source = args.data, args.data
        results = measure(data, args.batch_sizes)
    results["data"] = source
    print(report(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results)
    return 0
