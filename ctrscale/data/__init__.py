"""Data: the Criteo schema and every way rows get to the model.

- schema.py  the column layout, the Parquet schema, metadata.json and its table sizes
- prepare/   `ctrscale prepare`: raw Criteo TSV → day-partitioned Parquet
- synth/     `ctrscale synth`: synthetic Criteo-like data from a planted teacher
- loader/    `ParquetBatchLoader`: Parquet → TorchRec batches, sharded across ranks
"""
