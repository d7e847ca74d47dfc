"""Training: the loop (`loop.py`), exact evaluation, DCP checkpoints and metric logs."""
