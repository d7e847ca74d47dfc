"""Every named choice of the configuration, defined once.

The config's fields are typed with these enums, the CLI and the benchmarks list their members,
and the code compares against members, never against bare strings. `StrEnum` members are
their value (`ScalingRule.SQRT == "sqrt"`, `f"{ScalingRule.SQRT}"` is `sqrt`), so TOML files,
`--set` overrides and saved JSON keep plain strings. No torch import here: the CLI's argument
parser uses this module.
"""

from __future__ import annotations

from enum import StrEnum


class ModelName(StrEnum):
    DEEPFM = "deepfm"
    DLRM = "dlrm"
    DCNV2 = "dcnv2"
    WIDE_DEEP = "wide_deep"


class EmbeddingOptimizerName(StrEnum):
    """Optimizers of the embedding tables (`ctrscale/optim/embedding/optimizers.py`)."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"
    ROWWISE_NOVOGRAD = "rowwise_novograd"


class UpdateSemantics(StrEnum):
    """Which embedding rows an optimizer step changes.

    lazy: only the rows the global batch looks up (production sparse trainers, FBGEMM);
    dense: every row of every table at every step, L2 and optimizer state included (the
    CowClip paper's official Keras code); costs O(table rows × dim) per step.
    """

    LAZY = "lazy"
    DENSE = "dense"


class DenseOptimizerName(StrEnum):
    """Optimizers of the non-embedding parameters (`ctrscale/optim/dense/`)."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"
    LAMB = "lamb"
    LARS = "lars"
    LAMBC = "lambc"
    NOVOGRAD = "novograd"
    SNGM = "sngm"
    CBLR = "cblr"
    MCLR = "mclr"


class GradientTransform(StrEnum):
    """A transform of the dense gradient in front of the dense optimizer.

    gsnr: VRGD, each element scaled by its gradient signal-to-noise ratio over k micro-batch
    gradients; extrapolation: EXTRAP-SGD, the gradient taken at w − γ·(the rank's local
    gradient) and applied at w; past_extrapolation: the same with the previous step's gradient
    (one backward per step)."""

    NONE = "none"
    GSNR = "gsnr"
    EXTRAPOLATION = "extrapolation"
    PAST_EXTRAPOLATION = "past_extrapolation"


class CurvatureEstimate(StrEnum):
    """Per-layer curvature κ of CBLR/MCLR: the secant ‖Δg‖/‖Δw‖, or ‖g‖/‖w‖ (LARS's)."""

    SECANT = "secant"
    NORM_RATIO = "norm_ratio"


class ClipMode(StrEnum):
    """Per-id embedding-gradient clipping.

    off: none; paper: CowClip's Algorithm 1, exact on the global batch; fbgemm_rowwise:
    FBGEMM's fused variant (row-wise Adagrad with a running row counter) — not the paper's.
    """

    OFF = "off"
    PAPER = "paper"
    FBGEMM_ROWWISE = "fbgemm_rowwise"


class ScalingRule(StrEnum):
    """How base-batch learning rates, L2 and warm-up change with the batch size."""

    NONE = "none"
    LINEAR = "linear"
    SQRT = "sqrt"
    COWCLIP = "cowclip"
    REGIME = "regime"


class Decay(StrEnum):
    """Dense LR after the warm-up."""

    CONSTANT = "constant"
    COSINE = "cosine"
    STEP = "step"


class DeviceChoice(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class BackendChoice(StrEnum):
    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


class ShardingChoice(StrEnum):
    """TorchRec's sharding types of pooled tables (`torchrec.distributed.types.ShardingType`
    values), plus `auto`: the planner chooses among the fused ones."""

    AUTO = "auto"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    DATA_PARALLEL = "data_parallel"


class IdEncoding(StrEnum):
    """How `prepare` turns Criteo's hex categorical values into table rows."""

    HASH = "hash"
    VOCAB = "vocab"


class DenseTransform(StrEnum):
    LOG1P = "log1p"
    MINMAX = "minmax"


class Precision(StrEnum):
    """Arithmetic of the dense tower and interaction (ctrscale/train/precision.py)."""

    AUTO = "auto"  # bf16 where the device computes it natively, else fp32
    FP32 = "fp32"
    BF16 = "bf16"


class LoaderDecode(StrEnum):
    """Which rows each rank's loader decodes (ctrscale/data/loader/batch_loader.py)."""

    AUTO = "auto"  # sharded with several CUDA ranks, replicated otherwise
    # Every rank decodes the whole stream and keeps its slice of each global batch: batches
    # identical to one process's, at the decode rate of one process.
    REPLICATED = "replicated"
    # Each rank decodes its own contiguous share of the epoch: N times the decode rate; every
    # row still once per epoch in batches of exactly the global size, in another order.
    SHARDED = "sharded"


class RefreshHoldout(StrEnum):
    """The slice the daily refresh gates on: the new day's hash holdout, or the next day."""

    FRACTION = "fraction"
    NEXT_DAY = "next_day"


class SwapAverage(StrEnum):
    """How SWAP's phase 3 averages embedding rows over the replicas (dense layers: the mean)."""

    MEAN = "mean"
    TOUCH_WEIGHTED = "touch_weighted"


def names(choice: type[StrEnum]) -> str:
    """`a, b, c`: the members of an enum for an error message."""
    return ", ".join(member.value for member in choice)
