"""NeMo 1.0 ``.nemo`` archives: recognising, unpacking (once per node), reading ``model_config.yaml``.

A ``.nemo`` file is a tar archive (gzip-compressed in old versions) of::

    model_config.yaml             the ``model`` section of the training config
    model_weights/                megatron-core distributed checkpoint, keys ``model.decoder.layers...``
      or model_weights.ckpt       a torch state dict (one process)
      or mp_rank_XX/model_weights.ckpt, tp_rank_XX_pp_rank_XXX/model_weights.ckpt  (one per rank)
    <hash>_tokenizer.model, ...   tokenizer artifacts, referred to as ``nemo:<name>`` in the config
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.parallel.collectives import raise_on_every_rank
from nemo_dpo.parallel.processes import sweep_dead_staging

CONFIG_NAME = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
WEIGHTS_FILE = "model_weights.ckpt"
_COMPLETE = ".nemo_dpo_extracted"


def is_nemo_archive(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and tarfile.is_tarfile(path)


def is_nemo_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    has_weights = (path / WEIGHTS_DIR).is_dir() or (path / WEIGHTS_FILE).is_file()
    return has_weights or any(path.glob(f"*rank_*/{WEIGHTS_FILE}"))


def extract_nemo_archive(path: str | os.PathLike, extract_dir: str | os.PathLike | None = None) -> Path:
    """Unpack a ``.nemo`` file once per node and return the folder (call on every rank).

    The folder is ``<extract_dir>/<name>-<hash of path, size, mtime>``, reused
    while the archive is unchanged; ``extract_dir`` defaults to
    ``$NEMO_DPO_EXTRACT_DIR`` or the system temp folder. The first process of
    each node unpacks into a private folder and renames it into place.
    """
    path = Path(path).resolve()
    stat = path.stat()
    tag = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    base = Path(extract_dir or os.environ.get("NEMO_DPO_EXTRACT_DIR") or tempfile.gettempdir())
    target = base / f"{path.name.removesuffix('.nemo')}-{tag}"
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (target / _COMPLETE).is_file():
        try:
            _extract(path, base, target)
        except Exception as err:  # reported on every rank below
            error = f"could not unpack {path} into {target}: {err}"
    raise_on_every_rank(RuntimeError(error) if error else None)
    if not (target / _COMPLETE).is_file():
        raise RuntimeError(f"{target} is not a complete unpacking of {path}")
    return target


def _staging_prefix() -> str:
    # Hidden, and named by host and pid: the extract folder may be shared by nodes.
    return f".nemo_dpo_unpack.{socket.gethostname()}."


def _extract(path: Path, base: Path, target: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    sweep_dead_staging(base, _staging_prefix(), ".")  # left by killed runs on this host
    staging = base / f"{_staging_prefix()}{os.getpid()}.{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _unpack_checked(path, staging)
    except BaseException:  # refused or failed: nothing of it stays on disk
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / _COMPLETE).touch()
    try:
        os.replace(staging, target)
    except OSError:  # another node finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / _COMPLETE).is_file():
            raise


def _unpack_checked(path: Path, staging: Path) -> None:
    with tarfile.open(path, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, filter="data")
        else:  # Python without extraction filters: refuse paths leaving the folder
            for member in tar.getmembers():
                resolved = (staging / member.name).resolve()
                if not str(resolved).startswith(str(staging.resolve())) or member.issym() or member.islnk():
                    raise ValueError(f"unsafe member {member.name!r} in {path}")
            tar.extractall(staging)
    if not (staging / CONFIG_NAME).is_file():
        raise ValueError(f"{path} is not a NeMo checkpoint: it holds no {CONFIG_NAME}")


def read_nemo_config(folder: str | os.PathLike) -> DictConfig:
    """The ``model`` section of an unpacked ``.nemo``'s ``model_config.yaml``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a NeMo checkpoint: {CONFIG_NAME} is missing")
    config = OmegaConf.load(path)
    # Aligner / SFT configs sometimes nest the model section.
    if "model" in config and "num_layers" not in config:
        config = config.model
    return config
