"""The Criteo column layout, the Parquet schema every dataset here uses, and `metadata.json`.

Raw Criteo (Kaggle `train.txt`, 1TB `day_N`): 40 TAB-separated fields, no header:
label, I1..I13 (integer counts), C1..C26 (32-bit ids as 8 hex chars); empty = missing.

Prepared/synthetic Parquet: `label` int8 in {0,1}, `I1..I13` float32 (already transformed),
`C1..C26` int64 ids in [0, table_size). A dataset directory holds `day=N/part-*.parquet` and a
`metadata.json` whose `table_sizes` the loader validates ids against and the model sizes its
tables from. `validate_table_sizes` is the one check of table sizes, wherever they come from.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctrscale.errors import DataError

LABEL = "label"
DENSE_FEATURES: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
SPARSE_FEATURES: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
RAW_COLUMNS: tuple[str, ...] = (LABEL, *DENSE_FEATURES, *SPARSE_FEATURES)
NUM_RAW_FIELDS = len(RAW_COLUMNS)  # 40

# Column of the planted teacher's true click probability; only synthetic data has it.
TRUE_PROBABILITY = "p_true"

# Distinct raw values per categorical column in Criteo Kaggle train.txt (45,840,617 rows).
CRITEO_KAGGLE_CARDINALITIES: dict[str, int] = dict(
    zip(
        SPARSE_FEATURES,
        (
            1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
            27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
        ),
        strict=True,
    )
)  # fmt: skip

PARQUET_SCHEMA = pa.schema(
    [pa.field(LABEL, pa.int8(), nullable=False)]
    + [pa.field(name, pa.float32(), nullable=False) for name in DENSE_FEATURES]
    + [pa.field(name, pa.int64(), nullable=False) for name in SPARSE_FEATURES]
)

_FEATURE_RANGE = f"{SPARSE_FEATURES[0]}..{SPARSE_FEATURES[-1]}"

METADATA_FILE = "metadata.json"
METADATA_VERSION = 1


def validate_table_sizes(sizes: object, source: str) -> dict[str, int]:
    """`sizes` as {C1: size, …, C26: size} in feature order, or a `DataError` naming `source`
    (a metadata.json path, or the argument the sizes were passed as) and every bad entry."""
    expected = f"expected a positive integer size for each of {_FEATURE_RANGE} and nothing else"
    if sizes is None:
        raise DataError(f"{source}: no table_sizes; {expected}")
    if not isinstance(sizes, Mapping):
        raise DataError(f"{source}: table_sizes is a {type(sizes).__name__}; {expected}")
    missing = [name for name in SPARSE_FEATURES if name not in sizes]
    unknown = sorted(str(name) for name in sizes if name not in SPARSE_FEATURES)
    invalid = [
        f"{name}={sizes[name]!r}"
        for name in SPARSE_FEATURES
        if name in sizes and not _is_positive_integer(sizes[name])
    ]
    problems = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("no size for", missing),
            ("unknown features", unknown),
            ("invalid sizes", invalid),
        )
        if names
    ]
    if problems:
        raise DataError(f"{source}: table_sizes has {'; '.join(problems)}; {expected}")
    return {name: int(sizes[name]) for name in SPARSE_FEATURES}


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def read_metadata(dataset_dir: str | Path, filesystem: Any = None) -> dict[str, Any]:
    """The dataset's metadata.json, its `table_sizes` validated (a `DataError` if not) and in
    feature order; a clear error when the file is missing or not JSON. With a `pyarrow.fs`
    filesystem, `dataset_dir` is a path on it (an object store's bucket/prefix)."""
    path = f"{dataset_dir}/{METADATA_FILE}"
    try:
        if filesystem is None:
            text = Path(path).read_text()
        else:
            with filesystem.open_input_stream(path) as stream:
                text = stream.read().decode()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no dataset metadata; create the dataset with `ctrscale prepare` or "
            "`ctrscale synth`"
        ) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    meta["table_sizes"] = validate_table_sizes(meta.get("table_sizes"), path)
    return meta


def sha256_file(path: str | Path, *, sync: bool = False) -> str:
    """Digest of a file's bytes; with `sync`, the bytes are also flushed to disk first, so a
    manifest written after it never outlives the data it describes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()
