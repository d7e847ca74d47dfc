"""The one typed configuration shared by every command, TOML presets, `--set` overrides and tests.

A run is described by `Config`; TOML files mirror its sections (`[data]`, `[model]`, …) and
`--set section.key=value` overrides any field. Unknown keys and invalid values are errors that
name the key. Every default cites where it comes from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctrscale.choices import (
    BackendChoice,
    ClipMode,
    CurvatureEstimate,
    Decay,
    DenseOptimizerName,
    DenseTransform,
    DeviceChoice,
    EmbeddingOptimizerName,
    GradientTransform,
    IdEncoding,
    LoaderDecode,
    ModelName,
    Precision,
    RefreshHoldout,
    ScalingRule,
    ShardingChoice,
    SwapAverage,
    UpdateSemantics,
)
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_text_atomic

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class ConfigError(CtrscaleError):
    """A configuration that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(Section):
    """Where the Parquet data is and how it is batched."""

    train: list[str] = Field(default_factory=list, description="Parquet files, dirs or globs")
    eval: list[str] = Field(
        default_factory=list,
        description="held-out Parquet data; empty = hold out `holdout_fraction` of `train`",
    )
    # 10% is the CowClip paper's random 90/10 split of Criteo Kaggle.
    holdout_fraction: Fraction = 0.1
    holdout_seed: int = 0
    # 128K = 2^17, the CowClip paper's largest headline batch and TorchRec DLRM's 1TB batch.
    batch_size: PositiveInt = 131_072
    eval_batch_size: PositiveInt = 131_072
    drop_last: bool = True
    shuffle: bool = True
    # Rows mixed across row groups by the shuffle buffer: a few row groups' worth (prepare
    # writes 128K-row groups), bounded so memory does not grow with the dataset.
    shuffle_buffer_rows: PositiveInt = 1_048_576
    prefetch_batches: PositiveInt = 2
    # Batch-size ramp (ctrscale/train/ramp.py): start at this global batch and double up to
    # `batch_size` over the first `ramp_steps` steps; unset = no ramp.
    ramp_from_batch_size: PositiveInt | None = None
    ramp_steps: PositiveInt | None = None
    # Train on shard `shard_index` of `shard_count`: slice i of every global batch of
    # shard_count × batch_size rows, so the shards are disjoint and together all the data
    # (SWAP's phase-2 replicas, ctrscale/jobs/swap.py). 0 of 1 = all of it.
    shard_index: Annotated[int, Field(ge=0)] = 0
    shard_count: PositiveInt = 1
    # Whether each rank decodes the whole stream or its own share (see LoaderDecode); auto =
    # sharded with several CUDA ranks, where one process's decode rate would cap the job.
    decode: LoaderDecode = LoaderDecode.AUTO

    def sharded_decode(self, device_type: str, world_size: int) -> bool:
        """Whether this run's loaders decode per rank (`decode`, with `auto` resolved)."""
        if self.decode == LoaderDecode.AUTO:
            return device_type == "cuda" and world_size > 1 and self.shard_count == 1
        return self.decode == LoaderDecode.SHARDED

    @property
    def loader_batch_size(self) -> int:
        """The global batch the loader reads: a ramp's first batch (steps join them), times
        the shards (a shard is one slice of each)."""
        return (self.ramp_from_batch_size or self.batch_size) * self.shard_count

    @model_validator(mode="after")
    def _shard_in_range(self) -> DataConfig:
        if self.shard_index >= self.shard_count:
            raise ValueError(
                f"data.shard_index={self.shard_index} must be below data.shard_count="
                f"{self.shard_count}"
            )
        if self.shard_count > 1 and self.decode == LoaderDecode.SHARDED:
            raise ValueError(
                "data.decode='sharded' cannot be combined with data.shard_count > 1: a shard is "
                "a slice of every global batch, which needs the replicated stream"
            )
        return self


class ModelConfig(Section):
    """Architecture; table sizes come from the dataset's metadata.json."""

    name: ModelName = ModelName.DEEPFM
    # Paper (CowClip, DeepFM on Criteo) uses 10; FBGEMM kernels need a multiple of 4, and 12
    # is the nearest one that does not shrink the model.
    embedding_dim: PositiveInt = 12
    # DeepFM DNN 400-400-400 (CowClip paper / DeepCTR defaults).
    dnn: list[PositiveInt] = Field(default_factory=lambda: [400, 400, 400], min_length=1)
    # DLRM bottom MLP for dense features (torchrec_dlrm Criteo example); its last layer must
    # equal embedding_dim and is appended automatically.
    dense_arch: list[PositiveInt] = Field(default_factory=lambda: [512, 256])
    # DCNv2 cross network: 3 layers (torchrec_dlrm DCN example); the DCNv2 paper finds rank
    # ≈ d/4 keeps full-rank quality, and d = 27 fields × 12 = 324 here → 64 (rounded down).
    dcn_num_layers: PositiveInt = 3
    dcn_low_rank: PositiveInt = 64
    # Normal(0, 1e-2) embedding init (CowClip paper, "init std 1e-2").
    init_std: Annotated[float, Field(gt=0.0)] = 1e-2
    # Batch norm after each hidden layer of the DeepFM / Wide&Deep DNN (off, as DeepCTR and
    # the CowClip code), normalised over ghost batches of `ghost_batch_size` rows per rank
    # ("train longer", Hoffer et al. 2017; unset = the rank's whole batch).
    batch_norm: bool = False
    ghost_batch_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _dims_fbgemm_accepts(self) -> ModelConfig:
        if self.embedding_dim % 4:
            raise ValueError(
                f"model.embedding_dim={self.embedding_dim}: FBGEMM's embedding kernels need a "
                "multiple of 4 (e.g. 8, 12, 16)"
            )
        return self


class EmbeddingOptimConfig(Section):
    """Optimizer of the embedding tables (fused into the FBGEMM backward where supported)."""

    name: EmbeddingOptimizerName = EmbeddingOptimizerName.ADAM
    # CowClip paper: Adam on embeddings at lr 1e-4, kept fixed as the batch grows.
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # Adam paper defaults
    eps: Annotated[float, Field(gt=0.0)] = 1e-8  # Adam paper default
    novograd_betas: tuple[float, float] = (0.95, 0.98)  # NovoGrad paper (Ginsburg et al. 2019)
    # λ of the L2 penalty λ‖w‖² (Keras' l2(λ): gradient 2λw), added once per step to each row
    # the step updates (see `semantics`), before CowClip (as in the official code, where it is
    # part of the clipped gradient). LargeBatchCTR: 1e-5 at batch 1024; the cowclip rule
    # scales it by s.
    l2: NonNegativeFloat = 1e-5
    # Lazy: only rows of the batch change (FBGEMM, production trainers); dense: every row,
    # every step, as the official CowClip code's Keras optimizer does (see UpdateSemantics).
    semantics: UpdateSemantics = UpdateSemantics.LAZY


class DenseOptimConfig(Section):
    """Optimizer of every non-embedding parameter."""

    name: DenseOptimizerName = DenseOptimizerName.ADAM
    # CowClip paper: dense lr 8e-4 at the base batch (scaled by the scaling rule).
    lr: Annotated[float, Field(gt=0.0)] = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    momentum: NonNegativeFloat = 0.9  # SGD/LARS (LARS paper uses 0.9)
    weight_decay: NonNegativeFloat = 0.0
    # LARS trust coefficient η (You, Gitman & Ginsburg 2017 use 0.001).
    trust_coefficient: Annotated[float, Field(gt=0.0)] = 1e-3
    # Upper bound on the LAMB/LARS trust ratio; unset = unclipped, as in the papers (lambc:
    # 1.0, its README's best).
    trust_clip: Annotated[float, Field(gt=0.0)] | None = None
    novograd_betas: tuple[float, float] = (0.95, 0.98)  # NovoGrad paper (Ginsburg et al. 2019)
    # CBLR/MCLR's per-layer curvature: the secant ‖Δg‖/‖Δw‖ (our reading of Gao & Zhong 2020)
    # or ‖g‖/‖w‖, with which CBLR is LARS.
    curvature: CurvatureEstimate = CurvatureEstimate.SECANT
    # A gradient transform in front of the optimizer (see GradientTransform).
    transform: GradientTransform = GradientTransform.NONE
    # GSNR: gradient samples per step, micro-batches of the global batch (k/N per rank, so 1
    # and N processes compute the same); bounds of the normalised ratio — our reading of VRGD
    # (Jiang et al. 2023), whose exact bounds were not available: one decade either side.
    gsnr_samples: Annotated[int, Field(ge=2)] = 4
    gsnr_bounds: tuple[NonNegativeFloat, NonNegativeFloat] = (0.1, 10.0)
    # Clip the dense gradients' global norm to this before the step ("train longer"'s code
    # uses 5); unset = no clipping.
    clip_norm: Annotated[float, Field(gt=0.0)] | None = None
    # EXTRAP-SGD's extrapolation step γ; unset = the dense LR of the step (Lin et al. 2020 use
    # γ = η).
    extrapolation_gamma: NonNegativeFloat | None = None


class CowClipConfig(Section):
    """Per-id embedding-gradient clipping (CowClip paper, Algorithm 1)."""

    # The one switch of the clip (the scaling rule only sets learning rates, L2 and warm-up).
    # paper: the paper's method, exact on the global batch (ctrscale's gradient hook) — on by
    # default because it is the method ctrscale is built around; off: no clipping;
    # fbgemm_rowwise: FBGEMM's fused variant (row-wise Adagrad + WeightDecayMode.COWCLIP with a
    #   running row counter; clips the step, not the Adagrad state) — not the paper's method.
    mode: ClipMode = ClipMode.PAPER
    # LargeBatchCTR README `--clip 1`.
    r: Annotated[float, Field(gt=0.0)] = 1.0
    # The paper's ζ. Unset: the official code's convention ζ = r²·√d·bound, so its published
    # `--bound 1e-5` transfers exactly.
    zeta: NonNegativeFloat | None = None
    bound: NonNegativeFloat = 1e-5


class ScheduleConfig(Section):
    """Batch-size scaling of the base-batch hyperparameters, and the dense LR schedule."""

    # CowClip paper: hyperparameters tuned at batch 1024 and scaled by its rule up to 128K.
    rule: ScalingRule = ScalingRule.COWCLIP
    base_batch_size: PositiveInt = 1024
    # Dense-LR warm-up in steps, or as a fraction of the run's steps (the CowClip paper warms
    # up over 1 of its 10 epochs: 0.1); both unset = the rule's own (one epoch for cowclip,
    # none otherwise); warmup_steps wins when both are set.
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    warmup_fraction: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # Whether the cowclip rule scales the embedding L2 by s; unset = only under dense
    # semantics, where the rule's reasoning holds (see ctrscale/optim/scaling.py).
    scale_l2: bool | None = None
    decay: Decay = Decay.CONSTANT  # LargeBatchCTR: no decay
    step_milestones: list[PositiveInt] = Field(default_factory=list)
    step_gamma: Annotated[float, Field(gt=0.0)] = 0.1
    min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class OptimConfig(Section):
    """Base-batch hyperparameters; `schedule.rule` scales them to `data.batch_size`."""

    embedding: EmbeddingOptimConfig = Field(default_factory=EmbeddingOptimConfig)
    dense: DenseOptimConfig = Field(default_factory=DenseOptimConfig)
    cowclip: CowClipConfig = Field(default_factory=CowClipConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TrainConfig(Section):
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    eval_every_steps: PositiveInt | None = None
    checkpoint_every_steps: PositiveInt | None = None
    log_every_steps: PositiveInt = 10
    seed: int = 0
    tensorboard: bool = False
    # A checkpoint (a `step-N` directory, or a run/checkpoints directory with `latest`) whose
    # model — and optimizer state, unless disabled — start this run; step and data position
    # start fresh (unless `warm_start_continue_data`). The daily refresh warm-starts this way.
    warm_start: str | None = None
    warm_start_optimizer: bool = True
    # Also keep the run's checkpoints in an object store (s3://bucket/runs/x): uploaded after
    # each save, fetched by --resume when the run directory has none (a new machine).
    checkpoint_uri: str | None = None
    # A warm start that continues the checkpoint's data stream: the run starts at the row the
    # checkpoint stopped at (in this run's batches and shard), and its step count continues as
    # if it had trained those rows at its own batch size (SWAP's phase 2).
    warm_start_continue_data: bool = False
    # Stop (evaluate and save) at the first training record whose mean loss is below this
    # (SWAP's phase 1 "until a training-quality threshold"); unset = train to the end.
    stop_below_loss: Annotated[float, Field(gt=0.0)] | None = None
    # Evaluation by id frequency (ctrscale/train/frequency.py): lower edges of the buckets of
    # an eval row's rarest id, counted in the training split; [] = off. 5 and 100 follow the
    # rare/frequent split of the CTR frequency literature (and issue #11).
    frequency_buckets: list[PositiveInt] = Field(default_factory=lambda: [5, 100])
    # Drop this fraction of each global batch's rows with the smallest loss from the gradient
    # (Gao & Zhong 2020); 0 = off.
    discard_fraction: Fraction = 0.0
    # bf16 autocast of the dense tower and interaction (fp32 master weights, optimizer state,
    # embeddings, loss and metrics); auto = bf16 only where the device computes it natively
    # (ctrscale/train/precision.py). fp32 by default: the same numbers on every machine.
    precision: Precision = Precision.FP32


class TrackingConfig(Section):
    """Experiment tracking (ctrscale/train/tracking.py); `metrics.jsonl` and `curves.png` are
    written into every run directory whatever this says."""

    # An MLflow tracking URI (http://…, databricks, sqlite:///…, file:… with
    # MLFLOW_ALLOW_FILE_STORE=true); unset = no MLflow. Needs `pip install 'ctrscale[mlflow]'`.
    mlflow_uri: str | None = None
    experiment: str = "ctrscale"
    # The MLflow run's name; unset = the run directory's name (a sweep names its cells).
    run_name: str | None = None


class DistributedConfig(Section):
    device: DeviceChoice = DeviceChoice.AUTO
    backend: BackendChoice = BackendChoice.AUTO
    sharding_type: ShardingChoice = ShardingChoice.AUTO
    # Width of column-wise shards (TorchRec's `min_partition`); unset = the planner's default
    # of 128 columns (MIN_CW_DIM), under which a table narrower than 128 stays one shard.
    column_shard_dim: Annotated[int, Field(gt=0, multiple_of=4)] | None = None


class RefreshConfig(Section):
    """The daily refresh job (`ctrscale refresh`); see ctrscale/jobs/.

    A date D maps to the Parquet partition `dataset/day=YYYYMMDD` (the integer YYYYMMDD is the
    day number `ctrscale prepare` gets), and to its raw file through `raw_pattern`. The job sets
    `data.train`, `data.eval` and `train.warm_start` itself; every other section applies as in
    `ctrscale train`.
    """

    # Registry root: models/<date>/, the `latest` pointer, rejected/, work/ and the lock.
    registry: str = "models"
    # The Parquet dataset every day is prepared into (its metadata.json keeps the encoding,
    # so ids stay stable across days).
    dataset: str = "data/parquet"
    # Raw TSV (plain or .gz) of a day; {date} = YYYY-MM-DD, {yyyymmdd} = YYYYMMDD.
    raw_pattern: str = "data/raw/day_{yyyymmdd}.tsv.gz"
    # Encoding of a new dataset (the first day); later days must agree with metadata.json,
    # and a contradiction stops the job instead of silently shifting ids.
    ids: IdEncoding = IdEncoding.HASH
    dense_transform: DenseTransform = DenseTransform.LOG1P
    table_size: Annotated[int, Field(ge=2)] | None = None  # hash: None = Criteo's cardinalities
    min_count: PositiveInt | None = None  # vocab: None = prepare's default (4)
    # prepare's default: a day with more bad rows than this is refused.
    max_reject_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.001
    # Train on the new day and the K-1 days before it (those without partition or raw file
    # are skipped); 1 = the new day only.
    window_days: PositiveInt = 1
    # Gate slice: `fraction` = the data.holdout_fraction hash holdout of the new day (never
    # trained on); `next_day` = the whole following day (replaying history).
    holdout: RefreshHoldout = RefreshHoldout.FRACTION
    # Publish iff AUC_candidate >= AUC_published - auc_tolerance: 0.001 is the AUC difference
    # CTR papers (DeepFM, DCN) already call significant. Negative = demand an improvement.
    auc_tolerance: float = 0.001
    # Floor for every candidate, also the first one (no published model to compare with).
    min_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # Also publish every model to this object-store prefix (s3://bucket/ctr, gs://…): its
    # files, then its manifest, then the `latest` pointer (ctrscale/jobs/remote_registry.py).
    publish_uri: str | None = None
    # Training/evaluation processes: 1 = inside the refresh process; N > 1 = launched with
    # `torchrun --standalone --nproc_per_node N` (one per GPU).
    nproc: PositiveInt = 1

    @model_validator(mode="after")
    def _raw_pattern_placeholders(self) -> RefreshConfig:
        try:
            self.raw_pattern.format(date="2024-01-31", yyyymmdd="20240131")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"refresh.raw_pattern={self.raw_pattern!r}: only {{date}} and {{yyyymmdd}} may "
                f"be used ({exc!r})"
            ) from None
        return self


class SwapConfig(Section):
    """SWAP (Gupta, Serrano & DeCoste, ICLR 2020), `ctrscale swap`; see ctrscale/jobs/swap.py.

    Phase 1 trains at `data.batch_size` for `phase1_fraction` of the run's rows (or until the
    training loss falls below `train.stop_below_loss`); phase 2 trains `replicas` copies from
    its weights and optimizer state at `replica_batch_size` on disjoint shards of the rest of
    the data; phase 3 averages them and evaluates.
    """

    phase1_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    # W; the paper uses 8 workers.
    replicas: Annotated[int, Field(ge=2)] = 4
    # The small batch of each replica; unset = optim.schedule.base_batch_size.
    replica_batch_size: PositiveInt | None = None
    # Embedding rows: `touch_weighted` weighs each replica's row by how often its phase-2 data
    # looked the id up (a plain mean shrinks the update of an id one replica saw by W).
    average: SwapAverage = SwapAverage.TOUCH_WEIGHTED
    # Replica processes trained at once (on GPUs: one per device, `distributed.cuda_index`).
    parallel: PositiveInt = 1
    # Phase-1 processes (torchrun) for a model too large for one device; 1 = one process.
    phase1_nproc: PositiveInt = 1
    # Batches of training data that re-estimate batch-norm statistics after averaging (the
    # paper's step; only for models with `model.batch_norm`).
    bn_batches: PositiveInt = 16


class SyntheticData(Section):
    """Data `ctrscale bench auc-vs-batch` generates once with `ctrscale synth` and reuses."""

    rows: int = Field(gt=0)  # per day
    days: int = Field(default=1, gt=0)
    seed: int = Field(default=0, ge=0)
    cardinality_scale: float = Field(default=0.01, gt=0.0, le=1.0)
    dir: str | None = None  # default <out>/data


class BenchTable(Section):
    """A preset's `[bench]` table: the sweep of `ctrscale bench auc-vs-batch` (its command-line
    options override it). Validated with the rest of the config; other commands ignore it."""

    batch_sizes: list[int] | None = Field(default=None, min_length=1)  # None: base ×1 … ×128
    # none/sqrt/linear run with the clip off, cowclip with it on (ctrscale/bench/auc_vs_batch).
    rules: list[str] = Field(
        default_factory=lambda: ["none", "sqrt", "linear", "cowclip"], min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    synthetic: SyntheticData | None = None
    # Method modifiers of this preset (name → config overrides), over the built-in ones of
    # ctrscale/bench/methods.py: e.g. a dense optimizer with its base-batch LR.
    modifiers: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _modifier_names_are_plain(self) -> BenchTable:
        for name in self.modifiers:
            if not name.isidentifier():
                raise ValueError(
                    f"bench.modifiers.{name!r}: a modifier name is a plain word (letters, "
                    "digits, _), used as RULE+NAME in bench.rules"
                )
        return self


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    swap: SwapConfig = Field(default_factory=SwapConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    bench: BenchTable = Field(default_factory=BenchTable)

    @model_validator(mode="after")
    def _continued_data_needs_fixed_batches(self) -> Config:
        if self.train.warm_start_continue_data and self.data.ramp_from_batch_size is not None:
            raise ValueError(
                "train.warm_start_continue_data cannot be combined with data.ramp_from_batch_size:"
                " the step count of a ramped run is not rows / batch size"
            )
        return self

    @model_validator(mode="after")
    def _discarding_needs_full_batches(self) -> Config:
        if self.train.discard_fraction > 0 and not self.data.drop_last:
            raise ValueError(
                "train.discard_fraction > 0 needs data.drop_last = true: the rows dropped are "
                "ranked over equal global batches"
            )
        return self


def _parse_override_value(raw: str) -> Any:
    """TOML value syntax (`3`, `1e-4`, `true`, `[400, 400]`, `"x"`); bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    node[leaf] = _parse_override_value(raw.strip())


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = f" (got {item['input']!r})" if "input" in item and item["type"] != "missing" else ""
        lines.append(f"  {key}: {item['msg']}{got}")
    return "\n".join(lines)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class UserSettings(NamedTuple):
    """What a user gave on the command line: a TOML file's keys and `--set` overrides, before
    they are laid over a base (the defaults, or the config a checkpoint was written with)."""

    tree: dict[str, Any]
    source: str


def user_settings(path: str | Path | None = None, overrides: list[str] | None = None):
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = read_toml(path)
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    if overrides:
        source += " + --set " + " ".join(overrides)
    return UserSettings(tree, source)


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(settings: UserSettings, base: Config | None = None) -> Config:
    """`settings` laid over `base` (default: the defaults), validated."""
    tree = settings.tree
    if base is not None:
        tree = _deep_update(base.model_dump(mode="json", exclude_none=True), tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, settings.source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (optional), apply `section.key=value` overrides, validate."""
    return build_config(user_settings(path, overrides))


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: Config, new: Config, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """`key: old → new` for every setting under `prefixes` that differs."""
    before = _leaves(old.model_dump(mode="json"))
    after = _leaves(new.model_dump(mode="json"))
    return [
        f"{key}: {before.get(key)!r} → {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if key.startswith(prefixes) and before.get(key) != after.get(key)
    ]


def config_to_toml(config: Config) -> str:
    """The config as TOML; a `[bench]` table only when it is not the default (runs have none)."""
    tree = config.model_dump(mode="json", exclude_none=True)
    if config.bench == BenchTable():
        del tree["bench"]
    return tomli_w.dumps(tree)


def save_config(config: Config, path: str | Path) -> None:
    """Write the effective config (what actually ran) as TOML that `load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, config_to_toml(config))
