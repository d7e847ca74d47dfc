"""The streaming loader: Parquet row groups → TorchRec `Batch`es of exactly `batch_size` rows.

`ParquetBatchLoader` (batch_loader.py) is the public class; docs/loader.md describes what it
guarantees. It is built from one module per concern:

- dataset.py     paths → sorted files, dataset roots, footers, row groups, metadata table sizes
- holdout.py     the deterministic train/holdout split of rows (splitmix64 of file and row)
- shuffle.py     an epoch's seeded windows and permutations, and the buffer that serves them
- decode.py      row groups → the split's validated rows in one reused row-major buffer
- batches.py     batch arrays, blocked transposes, the KJT layout, `BatchWithExtras`
- validation.py  argument, schema and value checks
- prefetch.py    the background thread that assembles batches ahead of the consumer
"""

from ctrscale.data.loader.batch_loader import ParquetBatchLoader
from ctrscale.data.loader.batches import BatchWithExtras
from ctrscale.data.loader.dataset import resolve_parquet_files

__all__ = ["BatchWithExtras", "ParquetBatchLoader", "resolve_parquet_files"]
