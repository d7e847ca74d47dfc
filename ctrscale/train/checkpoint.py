"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP), and the
`Checkpointer` that decides when a run saves and what it starts from.

Layout of a checkpoint directory:
    step-00000120/        one DCP checkpoint (every rank writes its own shards)
        .metadata, __*.distcp
        config.toml       the configuration the run was trained with
        manifest.json     sha256 of every file above, verified before anything is loaded
        state.json        step, epoch, loader cursor, world size, table sizes (written last)
    latest                name of the newest complete checkpoint (replaced atomically)

A checkpoint describes itself: `evaluate`, `--resume` and warm starts take the model from its
config.toml, and refuse a configuration or data whose model differs, naming the keys.

A checkpoint is written to a hidden temp directory and renamed into place only after every
rank has finished, so a crash leaves either the previous checkpoint or the new one. DCP
re-shards on load, so a run may resume with a different world size.

DCP keeps its metadata as a pickle; `SafeFileSystemReader` unpickles it with an allow-list of
DCP's own metadata classes so that loading a checkpoint never runs arbitrary code, and tensor
payloads are read by DCP with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from ctrscale.config import Config, config_to_toml, differences, load_config
from ctrscale.data.schema import sha256_file
from ctrscale.distributed.context import barrier, is_main_process
from ctrscale.errors import CtrscaleError, TrainingDiverged
from ctrscale.files import publish_dir, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from ctrscale.data.loader import ParquetBatchLoader
    from ctrscale.train.checkpoint_mirror import CheckpointMirror
    from ctrscale.train.step import Trainer

LATEST = "latest"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.toml"


class CheckpointError(CtrscaleError):
    """A checkpoint that is corrupt, incomplete, or of another model than asked for."""


# Modules whose classes may appear in DCP's pickled metadata: its own dataclasses, torch's
# Size/dtype/layout/memory_format, and plain containers.
_SAFE_MODULE_PREFIXES = (
    "torch.distributed.checkpoint.",
    "torch.distributed._shard.sharded_tensor.metadata",
    "torch.distributed._shard.metadata",
)
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch", "float64"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "int8"),
    ("torch", "uint8"),
    ("torch", "bool"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name back to torch.strided etc.
    ("pathlib", "PosixPath"),  # DCP records where it saved (inert: just a path string)
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "getattr"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or module.startswith(_SAFE_MODULE_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which is not a checkpoint type; "
            "refusing to load it"
        )


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as exc:
            raise CtrscaleError(f"{path}: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise CtrscaleError(f"{path}: not a DCP checkpoint metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise CtrscaleError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def save_checkpoint(
    directory: str | Path,
    step: int,
    tensors: dict[str, Any],
    state: dict[str, Any],
    config: Config,
    keep: int = 2,
) -> Path:
    """Write `tensors` (state dicts, sharded or not) with DCP, the config, a manifest of every
    file and `state` as JSON; collective."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    staging = directory / f".step-{step:08d}.tmp"
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    dcp.save(tensors, checkpoint_id=staging)
    barrier()
    if is_main_process():
        write_text_atomic(staging / CONFIG_FILE, config_to_toml(config))
        files = sorted(p for p in staging.iterdir() if p.is_file())
        manifest = {p.name: sha256_file(p, sync=True) for p in files}
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        write_json_atomic(staging / STATE_FILE, {**state, "step": step})
        publish_dir(staging, final)  # a re-run that reached the same step replaces it
        write_text_atomic(directory / LATEST, final.name + "\n")
        _prune(directory, keep=keep, current=final)
    barrier()
    return final


def _prune(directory: Path, keep: int, current: Path) -> None:
    complete = sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).exists())
    for old in complete[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Every file against the manifest's sha256; the ranks share the hashing. Raises
    `CheckpointError` naming the corrupt or missing files."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: no readable {MANIFEST_FILE} ({exc})") from None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = []
    for name, expected in sorted(manifest.items())[rank::world]:
        file = path / name
        if not file.exists():
            problems.append(f"{file} is missing")
        elif sha256_file(file) != expected:
            problems.append(f"{file} is corrupt (its sha256 differs from {MANIFEST_FILE}'s)")
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, problems)
        problems = [problem for part in gathered for problem in part]
    if problems:
        raise CheckpointError("; ".join(problems))


def checkpoint_config(path: Path) -> Config:
    """The configuration a checkpoint was written with."""
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a ctrscale checkpoint")
    return load_config(path / CONFIG_FILE)


def load_checkpoint(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Verify, then load into `tensors` in place (re-sharding as needed); returns the JSON
    state."""
    path = Path(path)
    verify_checkpoint(path)
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # refuse here: inside dcp.load a refusal is wrapped and obscured
    dcp.load(tensors, storage_reader=reader)
    return json.loads((path / STATE_FILE).read_text())


# What the tensors of a checkpoint depend on: the model, and the optimizers' state layouts.
MODEL_KEYS = ("model.",)
OPTIMIZER_KEYS = ("optim.embedding.name", "optim.dense.name")


def check_compatible(path: Path, trainer: Trainer, with_optimizer: bool) -> None:
    """A clear error, naming the keys or tables, when `path` holds another model than
    `trainer`'s (instead of a page of DCP errors, or a silent partial load)."""
    saved = checkpoint_config(path)
    keys = MODEL_KEYS + (OPTIMIZER_KEYS if with_optimizer else ())
    changed = differences(saved, trainer.config, keys)
    if changed:
        raise CheckpointError(
            f"{path} holds another model than this run's configuration: "
            + "; ".join(changed)
            + " (saved → this run's)"
        )
    state = json.loads((path / STATE_FILE).read_text())
    saved_sizes = state.get("table_sizes", {})
    other = {k: (saved_sizes.get(k), v) for k, v in trainer.table_sizes.items()}
    other = {k: sizes for k, sizes in other.items() if sizes[0] != sizes[1]}
    if other:
        raise CheckpointError(
            f"{path} has other table sizes than this run's data: "
            + ", ".join(f"{k}: {saved} → {now}" for k, (saved, now) in sorted(other.items()))
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N` checkpoint, or the newest one of a checkpoints directory or run directory."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    for directory in (path, path / "checkpoints"):
        if (directory / LATEST).exists():
            return latest_checkpoint(directory)
    raise CtrscaleError(f"{path}: not a checkpoint, nor a directory with a `latest` checkpoint")


def load_into(trainer: Trainer, path: Path, with_optimizer: bool) -> dict[str, Any]:
    """Load a checkpoint into `trainer` (model, and optimizers unless not asked for); returns
    the checkpoint's JSON state."""
    check_compatible(path, trainer, with_optimizer)
    tensors = trainer.tensors_to_load(with_optimizer)
    state = load_checkpoint(path, tensors)
    trainer.load_state_tensors(tensors)
    return state


@dataclass
class Progress:
    """Where a run is: optimizer steps taken, the epoch, global rows trained on."""

    step: int = 0
    epoch: int = 0
    rows_seen: int = 0

    def advance(self, global_rows: int) -> None:
        self.step += 1
        self.rows_seen += global_rows


class Checkpointer:
    """A run's `checkpoints/` directory: saves every `every` steps (and when asked at the
    end), restores the latest checkpoint with the loader's position, or warm-starts."""

    def __init__(
        self,
        directory: Path,
        every: int | None,
        trainer: Trainer,
        loader: ParquetBatchLoader,
        mirror: CheckpointMirror | None = None,
    ) -> None:
        self.directory = directory
        self.every = every
        self.trainer = trainer
        self.loader = loader
        self.mirror = mirror  # the object-store copy (checkpoint_mirror.py), if any

    def existing_checkpoints(self) -> str | None:
        """Where checkpoints a new run would overwrite are: this run directory, or the
        object-store copy; None when there are none."""
        if (self.directory / LATEST).exists():
            return str(self.directory.parent)
        if self.mirror is not None and self.mirror.latest() is not None:
            return self.mirror.store.uri
        return None

    def restore(self) -> Progress | None:
        """Continue from the latest checkpoint, exactly where it stopped (fetched from the
        object-store copy when there is none here); None without one."""
        if self.mirror is not None:
            # Only rank 0 looks: a rank that looked after rank 0's download had written
            # `latest` would skip the barrier the others wait in. (The run directory is shared
            # by all ranks, as DCP's saves need it to be.)
            if is_main_process() and not (self.directory / LATEST).exists():
                self.mirror.download_latest(self.directory)
            barrier()
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        state = load_into(self.trainer, path, with_optimizer=True)
        self.loader.load_state_dict(state["loader"])
        return Progress(step=state["step"], epoch=state["epoch"], rows_seen=state["rows_seen"])

    def warm_start(
        self, source: str | Path, with_optimizer: bool, continue_data: bool, steps_per_epoch: int
    ) -> Progress:
        """Start from another run's model (and optimizer state). Step and data start fresh, or
        with `continue_data` at the row where the source stopped reading, the step count
        continuing as if this run had trained those rows at its own batch size."""
        state = load_into(self.trainer, resolve_checkpoint(source), with_optimizer)
        if not continue_data:
            return Progress()
        self.loader.continue_from(state["loader"])
        cursor = self.loader.state_dict()
        step = cursor["epoch"] * steps_per_epoch + cursor["batches_done"]
        rows = step * self.trainer.config.data.batch_size
        return Progress(step=step, epoch=cursor["epoch"], rows_seen=rows)

    def after_step(self, progress: Progress) -> None:
        if self.every and progress.step % self.every == 0:
            self.save(progress)

    def save(self, progress: Progress) -> None:
        if not self.trainer.all_finite():
            last = latest_checkpoint(self.directory)
            raise TrainingDiverged(
                f"a parameter became non-finite by step {progress.step}; not saving it "
                f"(the last good checkpoint is {last or 'none'}); lower the learning rates"
            )
        state = {
            **asdict(progress),
            "loader": self.loader.state_dict(),
            "world_size": self.trainer.ctx.world_size,
            "table_sizes": self.trainer.table_sizes,
        }
        del state["step"]  # save_checkpoint records it
        tensors = self.trainer.state_tensors()
        saved = save_checkpoint(self.directory, progress.step, tensors, state, self.trainer.config)
        if self.mirror is not None:
            if is_main_process():
                self.mirror.upload(saved)
            barrier()
