"""Unattended jobs: the daily refresh (`ctrscale refresh`, refresh.py) and what it owns — the
model registry with its atomic `latest` pointer (registry.py), dates mapped to verified Parquet
day partitions (partitions.py), and running training and evaluation in-process or under
torchrun (launch.py). One refresh per registry holds `ctrscale/locking.py`'s lock."""
