"""Unattended jobs: the daily refresh (`ctrscale refresh`, refresh.py) and what it owns — the
model registry with its atomic `latest` pointer (registry.py), the lock that keeps one refresh
per registry (lock.py), dates mapped to verified Parquet day partitions (partitions.py), and
running training and evaluation in-process or under torchrun (launch.py)."""
