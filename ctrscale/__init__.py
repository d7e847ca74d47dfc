"""ctrscale: large-batch CTR training on TorchRec.

Packages, in the order data flows through them:
  data/         Criteo schema, TSV → Parquet (polars), synthetic data, Parquet → Batch (pyarrow)
  models/       DeepFM, DLRM, DCNv2, Wide&Deep on torchrec.EmbeddingBagCollection
  optim/        CowClip, LAMB/LARS, scaling rules, schedules, optimizer wiring
  distributed/  process groups, sharding plans, DistributedModelParallel
  train/        the training loop, exact evaluation, checkpoints, metric logs
  bench/        throughput and AUC-versus-batch-size benchmarks
  jobs/         the daily refresh and the model registry
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctrscale")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
