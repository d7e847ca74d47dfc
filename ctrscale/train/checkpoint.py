"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from ctrscale.data.schema import write_json_atomic
from ctrscale.errors import CtrscaleError

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
        if final.exists():  # a re-run that reached the same step: replace it
            shutil.rmtree(final)
        staging.rename(final)
        pointer_tmp = directory / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        pointer_tmp.replace(directory / LATEST)
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


def rng_states() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
