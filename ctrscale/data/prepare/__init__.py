"""`ctrscale prepare`: raw Criteo TSV (plain or .gz) → day-partitioned Parquet.

docs/prepare.md describes the dataset it writes. One module per stage of the conversion:

- parse.py     reading raw lines in bounded chunks, validating and typing them, rejects
- encoding.py  the dense transform and categorical ids, fitted once and stored in metadata.json
- vocab.py     the `--ids vocab` vocabulary and its `_vocab/` artifact
- writer.py    one day's Parquet parts, its `_manifest.json`, and publishing it atomically
- job.py       `prepare_files` and the CLI: days, the dataset lock, metadata and the summary
"""

from ctrscale.data.prepare.job import SUMMARY_FILE, prepare_files, run_cli
from ctrscale.data.prepare.writer import MANIFEST_FILE

__all__ = ["MANIFEST_FILE", "SUMMARY_FILE", "prepare_files", "run_cli"]
