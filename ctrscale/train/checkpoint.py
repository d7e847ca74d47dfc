"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP), and the
`Checkpointer` that decides when a run saves and what it starts from.

Layout of a checkpoint directory:
    step-00000120/        one DCP checkpoint (every rank writes its own shards)
        .metadata, __*.distcp
        state.json        step, epoch, loader cursor, world size (plain JSON, no pickle)
    latest                name of the newest complete checkpoint (replaced atomically)

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

from ctrscale.errors import CtrscaleError
from ctrscale.files import publish_dir, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from ctrscale.data.loader import ParquetBatchLoader
    from ctrscale.train.step import Trainer

LATEST = "latest"
STATE_FILE = "state.json"

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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
    directory: str | Path, step: int, tensors: dict[str, Any], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write `tensors` (state dicts, sharded or not) with DCP plus `state` as JSON; collective."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    staging = directory / f".step-{step:08d}.tmp"
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=staging)
    _barrier()
    if _is_main():
        write_json_atomic(staging / STATE_FILE, {**state, "step": step})
        publish_dir(staging, final)  # a re-run that reached the same step replaces it
        write_text_atomic(directory / LATEST, final.name + "\n")
        _prune(directory, keep=keep, current=final)
    _barrier()
    return final


def _prune(directory: Path, keep: int, current: Path) -> None:
    complete = sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).exists())
    for old in complete[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Load into `tensors` in place (re-sharding as needed); returns the JSON state."""
    path = Path(path)
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # refuse here: inside dcp.load a refusal is wrapped and obscured
    dcp.load(tensors, storage_reader=reader)
    return json.loads((path / STATE_FILE).read_text())


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
        self, directory: Path, every: int | None, trainer: Trainer, loader: ParquetBatchLoader
    ) -> None:
        self.directory = directory
        self.every = every
        self.trainer = trainer
        self.loader = loader

    def has_checkpoint(self) -> bool:
        return (self.directory / LATEST).exists()

    def restore(self) -> Progress | None:
        """Continue from the latest checkpoint, exactly where it stopped; None without one."""
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        state = load_into(self.trainer, path, with_optimizer=True)
        self.loader.load_state_dict(state["loader"])
        return Progress(step=state["step"], epoch=state["epoch"], rows_seen=state["rows_seen"])

    def warm_start(self, source: str | Path, with_optimizer: bool) -> None:
        """Start from another run's model (and optimizer state): step and data start fresh."""
        load_into(self.trainer, resolve_checkpoint(source), with_optimizer)

    def after_step(self, progress: Progress) -> None:
        if self.every and progress.step % self.every == 0:
            self.save(progress)

    def save(self, progress: Progress) -> None:
        state = {
            **asdict(progress),
            "loader": self.loader.state_dict(),
            "world_size": self.trainer.ctx.world_size,
        }
        del state["step"]  # save_checkpoint records it
        save_checkpoint(self.directory, progress.step, self.trainer.state_tensors(), state)
