"""The Criteo column layout, the Parquet schema every dataset here uses, and `metadata.json`.

Raw Criteo (Kaggle `train.txt`, 1TB `day_N`): 40 TAB-separated fields, no header:
label, I1..I13 (integer counts), C1..C26 (32-bit ids as 8 hex chars); empty = missing.

Prepared/synthetic Parquet: `label` int8 in {0,1}, `I1..I13` float32 (already transformed),
`C1..C26` int64 ids in [0, table_size). A dataset directory holds `day=N/part-*.parquet` and a
`metadata.json` whose `table_sizes` the loader validates ids against and the model sizes its
tables from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

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

METADATA_FILE = "metadata.json"
METADATA_VERSION = 1


def read_metadata(dataset_dir: str | Path) -> dict[str, Any]:
    """The dataset's metadata.json; a clear error when it is missing or lacks table sizes."""
    path = Path(dataset_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no dataset metadata; create the dataset with `ctrscale prepare` or "
            "`ctrscale synth`"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    sizes = meta.get("table_sizes")
    if not isinstance(sizes, dict) or set(sizes) != set(SPARSE_FEATURES):
        raise ValueError(f"{path}: 'table_sizes' must give a size for each of C1..C26")
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
