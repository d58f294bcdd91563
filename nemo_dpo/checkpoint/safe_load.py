"""The one way nemo-dpo reads torch files: ``weights_only`` loads that never run code from the file."""

from __future__ import annotations

import os
import pickle

import torch


class UnsafeFileError(ValueError):
    """A torch file holding objects whose unpickling could run code; it was not unpickled."""


def load_tensors(path: str | os.PathLike, allowed: list | tuple = (), mmap: bool = False):
    """``torch.load(path)`` admitting tensors, plain containers and the types in ``allowed`` only.

    Anything else raises :class:`UnsafeFileError` naming the file and the types it holds.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        allowed_names = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
        found = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                 if name not in allowed_names]
        kinds = ", ".join(found) if found else " ".join(str(err).split())[:200]
        raise UnsafeFileError(
            f"{path} holds objects of type {kinds}, which nemo-dpo does not unpickle "
            "(unpickling can run any code in the file)"
        ) from err
