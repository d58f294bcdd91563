"""The one way nemo-dpo reads torch files: ``weights_only`` loads that never run code from the file.

Distributed checkpoints are checked by :func:`check_dist_checkpoint_files`
before megatron or torch read them (torch would unpickle parts in full).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata


class UnsafeFileError(ValueError):
    """A torch file holding objects whose unpickling could run code; it was not unpickled."""


def load_tensors(path: str | os.PathLike | io.BytesIO, allowed: list | tuple = (), mmap: bool = False,
                 name: str | None = None):
    """``torch.load(path)`` admitting tensors, plain containers and the types in ``allowed`` only.

    Anything else raises :class:`UnsafeFileError` naming the file (or ``name``) and the types it holds.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        allowed_names = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
        if isinstance(path, io.BytesIO):
            path.seek(0)
        found = [kind for kind in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                 if kind not in allowed_names]
        kinds = ", ".join(found) if found else " ".join(str(err).split())[:200]
        raise UnsafeFileError(
            f"{name or path} holds objects of type {kinds}, which nemo-dpo does not unpickle "
            "(unpickling can run any code in the file)"
        ) from err


# What torch's distributed-checkpoint ``.metadata`` pickle is made of: plain data classes and enums.
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = {
    (f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.planner", name) for name in (
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType", "LoadItemType", "TensorWriteData",
        "BytesIOWriteData")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # torch records the checkpoint's path
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        value = super().find_class(module, name) if module == "torch" or (module, name) in _METADATA_GLOBALS else None
        if (module, name) in _METADATA_GLOBALS or isinstance(value, _TORCH_VALUES):
            return value
        raise _Refused(f"{module}.{name}")


def _unreadable(path, err: Exception) -> ValueError:
    return ValueError(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())})")


def check_dist_checkpoint_files(directory: str | os.PathLike) -> None:
    """Refuse a distributed checkpoint whose pickles could run code, before torch reads it.

    torch unpickles ``.metadata`` in full, and each non-tensor item with
    ``weights_only=False``; here the first is read with an unpickler that
    admits only the metadata classes, the items with :func:`load_tensors`, so
    that what torch then reads is known to be plain data. Raises
    :class:`UnsafeFileError` naming the file, or ``ValueError`` if one cannot be read.
    """
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except _Refused as err:
        raise UnsafeFileError(
            f"{path} holds objects of type {err}, which nemo-dpo does not unpickle "
            "(unpickling can run any code in the file)"
        ) from err
    except Exception as err:  # a damaged pickle fails in many ways
        raise _unreadable(path, err) from err
    name = str(path)
    try:
        for index, info in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                shard = Path(directory) / info.relative_path
                name = f"{shard} (item {index.fqn})"
                with open(shard, "rb") as handle:
                    handle.seek(info.offset)
                    load_tensors(io.BytesIO(handle.read(info.length)), [io.BytesIO], name=name)
    except UnsafeFileError:
        raise
    except Exception as err:  # damaged metadata or bytes fail in many ways
        raise _unreadable(name, err) from err
