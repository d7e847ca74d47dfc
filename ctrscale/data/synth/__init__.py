"""`ctrscale synth`: synthetic Criteo-like data from a planted teacher, whose true click
probability is known, so a model's AUC and LogLoss can be set against the Bayes-optimal ones.

- teacher.py   the planted model: cardinalities, id frequencies, the logit and its calibration
- rows.py      chunks of rows: feature distributions and the seeded, ordered chunk stream
- days.py      writing a day (Parquet, or raw TSV with hex ids), its truth histogram, metrics
- generate.py  `generate()` and the CLI: the day loop, metadata.json, extending a directory
"""

from ctrscale.data.synth.generate import generate, run_cli

__all__ = ["generate", "run_cli"]
