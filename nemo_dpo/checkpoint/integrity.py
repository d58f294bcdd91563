"""Is a checkpoint folder intact? Its manifest, and one-line errors naming the damaged file.

Every folder :func:`~nemo_dpo.checkpoint.dist_ckpt.atomic_checkpoint_dir` writes
gets ``manifest.json`` last, before its completion marker: the size and
SHA-256 of every other file. :func:`folder_problem` checks it (a missing,
extra, resized or altered file is named); folders saved before manifests
existed get the checks their files allow (distributed-checkpoint metadata,
shards long enough for it) and one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPLETE_MARKER = ".complete"
# Written after the manifest, so neither can list it (nor itself).
_UNLISTED = (MANIFEST, COMPLETE_MARKER)
_HASH = "sha256"
_warned_unlisted: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the checkpoint and the file."""


def _files(folder: Path) -> dict[str, Path]:
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in _UNLISTED
    }


def _digest(path: Path) -> str:
    digest = hashlib.new(_HASH)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(files: dict[str, Path]) -> dict[str, str]:
    # hashlib lets go of the GIL on large buffers: files hash in parallel, one pass each.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(_digest, files.values())))


def write_manifest(folder: str | os.PathLike) -> None:
    """Record size and checksum of every file of ``folder`` in its manifest (after all are written)."""
    folder = Path(folder)
    listed = _files(folder)
    digests = _digests(listed)
    files = {name: {"size": path.stat().st_size, _HASH: digests[name]} for name, path in listed.items()}
    target = folder / MANIFEST
    with open(target, "w") as handle:
        json.dump({"version": 1, "files": files}, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _manifest_problem(folder: Path) -> str | None:
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry[_HASH])) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} cannot be read ({type(err).__name__}: {err})"
    present = _files(folder)
    missing, extra = sorted(expected.keys() - present.keys()), sorted(present.keys() - expected.keys())
    if missing:
        return f"{missing[0]} is missing"
    if extra:
        return f"{extra[0]} is not in its {MANIFEST}"
    # Sizes first: they are free, and a resized file needs no hashing to be named.
    for name, (size, _) in sorted(expected.items()):
        actual = present[name].stat().st_size
        if actual < size:
            return f"{name} is truncated ({actual} of {size} bytes)"
        if actual > size:
            return f"{name} has {actual} bytes, its {MANIFEST} says {size}"
    actual_digests = _digests(present)
    for name, (_, digest) in sorted(expected.items()):
        if actual_digests[name] != digest:
            return f"{name} fails its {_HASH} checksum (its contents changed after the save)"
    return None


def _dist_folder_problem(folder: Path, name: str) -> str | None:
    """What a manifest-less distributed checkpoint ``folder/name`` shows wrong: metadata, missing or short shards."""
    try:
        check_dist_checkpoint_files(folder / name)
    except ValueError as err:
        return f"{name}/ cannot be read ({one_line(err)})"
    try:
        metadata = FileSystemReader(str(folder / name)).read_metadata()
    except Exception as err:  # any unreadable metadata means a damaged checkpoint
        return f"{name}/ metadata cannot be read ({one_line(err)})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative, size in sorted(needed.items()):
        path = folder / name / relative
        if not path.is_file():
            return f"{name}/{relative} is missing"
        if path.stat().st_size < size:
            return f"{name}/{relative} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def folder_problem(folder: str | os.PathLike, dist_folders: tuple[str, ...]) -> str | None:
    """What is damaged in the completed checkpoint ``folder`` (naming the file), or None.

    With a manifest every file is checked against it; without one (saved by an
    older nemo-dpo) only the distributed checkpoints ``dist_folders`` can be.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return _manifest_problem(folder)
    if str(folder) not in _warned_unlisted:
        _warned_unlisted.add(str(folder))
        log.warning("%s has no %s (saved by an older nemo-dpo): its files cannot be checksummed", folder, MANIFEST)
    for name in dist_folders:
        problem = _dist_folder_problem(folder, name)
        if problem:
            return problem
    return None


def one_line(err: BaseException) -> str:
    """``Type: message`` of ``err`` on one line (megatron's and torch's errors span many)."""
    if isinstance(err, CheckpointException) and err.failures:
        # Its text holds every rank's traceback; the first rank's error says what went wrong.
        err = next(iter(err.failures.values()))[0]
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def reading(checkpoint: str | os.PathLike, file: str, dist_folders: tuple[str, ...] = ()) -> Iterator[None]:
    """Turn any failure to read ``file`` of ``checkpoint`` into one :class:`CheckpointError` naming both.

    For a distributed checkpoint ``file`` is its folder; ``dist_folders`` are
    then checked to name the damaged shard (a read error seldom does).
    """
    try:
        yield
    except CheckpointError:
        raise
    # torch, megatron and the OS raise many kinds (torch's CheckpointException is no Exception):
    # all mean an unreadable file.
    except (Exception, CheckpointException) as err:
        problem = folder_problem(checkpoint, dist_folders) if dist_folders else None
        where = problem or file
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {where}: {one_line(err)}") from err
