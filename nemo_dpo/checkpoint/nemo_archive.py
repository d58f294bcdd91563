"""NeMo 1.0 ``.nemo`` checkpoints of megatron-core GPT models (``mcore_gpt: true``).

A ``.nemo`` file is a tar archive (gzip-compressed in old versions) of::

    model_config.yaml             the ``model`` section of the training config
    model_weights/                megatron-core distributed checkpoint, keys ``model.decoder.layers...``
      or model_weights.ckpt       a torch state dict (one process)
      or mp_rank_XX/model_weights.ckpt, tp_rank_XX_pp_rank_XXX/model_weights.ckpt  (one per rank)
    <hash>_tokenizer.model, ...   tokenizer artifacts, referred to as ``nemo:<name>`` in the config

The config already uses our key names, so the architecture is mostly a copy,
with NeMo spellings normalised (``fast-swiglu`` -> ``swiglu``) and every setting
our builder cannot honour refused by name. Distributed checkpoints load
directly: their keys are the checkpoint keys of our models (transformer-engine
spelling ``self_attention.linear_qkv.layer_norm_weight`` for the norms, which the
local layer spec maps onto ``input_layernorm``). Torch state dicts are keyed by
module names in either spelling; both are mapped to checkpoint keys, and
tensor-parallel files are merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import warnings
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from omegaconf import DictConfig, OmegaConf

from nemo_dpo.checkpoint.dist_ckpt import KEY_PREFIX, model_sharded_state_dict
from nemo_dpo.parallel.collectives import barrier, raise_on_every_rank
from nemo_dpo.checkpoint.tokenizer_files import stage_tokenizer_dir, tokenizer_files_in
from nemo_dpo.checkpoint.weight_transfer import (
    LAYER_PREFIX,
    OUTPUT_LAYER_KEY,
    VOCAB_KEYS,
    Slot,
    fill_from,
    global_tensor_shapes,
)

CONFIG_NAME = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
WEIGHTS_FILE = "model_weights.ckpt"
_COMPLETE = ".nemo_dpo_extracted"

_ACTIVATIONS = {
    "gelu": "gelu", "swiglu": "swiglu", "fast-swiglu": "swiglu", "geglu": "geglu",
    "fast-geglu": "geglu", "squared-relu": "squared-relu",
}
# NeMo settings our model cannot reproduce, with the value that is harmless.
_MUST_BE_DEFAULT = {
    "num_moe_experts": (None, 0, 1),
    "seq_len_interpolation_factor": (None,),
    "scale_positional_embedding": (None, False),
    "rotary_interleaved": (None, False),
    "transformer_block_type": (None, "pre_ln"),
    "layernorm_zero_centered_gamma": (None, False),
    "apply_residual_connection_post_layernorm": (None, False),
    "normalize_attention_scores": (None, True),
    "headscale": (None, False),
    "window_size": (None,),
    "context_parallel_size": (None, 1),
}


# --------------------------------------------------------------------------- archive


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


def _extract(path: Path, base: Path, target: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{target.name}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
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
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"{path} is not a NeMo checkpoint: it holds no {CONFIG_NAME}")
    (staging / _COMPLETE).touch()
    try:
        os.replace(staging, target)
    except OSError:  # another node finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / _COMPLETE).is_file():
            raise


# --------------------------------------------------------------------------- config


def read_nemo_config(folder: str | os.PathLike) -> DictConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a NeMo checkpoint: {CONFIG_NAME} is missing")
    config = OmegaConf.load(path)
    # Aligner / SFT configs sometimes nest the model section.
    if "model" in config and "num_layers" not in config:
        config = config.model
    return config


def _get(config: DictConfig, key: str, default=None):
    value = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
    return default if value is None else value


def architecture_from_nemo_config(config: DictConfig) -> dict:
    """Our architecture keys from a NeMo 1.0 GPT ``model_config.yaml``; unsupported settings raise."""
    target = str(_get(config, "target", ""))
    if target and "GPT" not in target:
        raise ValueError(f"{target} is not a GPT model; only megatron-core GPT .nemo checkpoints are supported")
    if not _get(config, "mcore_gpt", False):
        raise ValueError(
            "this .nemo holds a legacy (mcore_gpt: false) NeMo GPT model, whose weight names differ; "
            "only megatron-core GPT checkpoints (mcore_gpt: true) are supported"
        )
    for key, harmless in _MUST_BE_DEFAULT.items():
        value = _get(config, key)
        if value not in harmless:
            raise ValueError(f"model_config.yaml sets {key}={value!r}, which nemo-dpo does not support")
    normalization = _get(config, "normalization", "layernorm")
    if normalization not in ("layernorm", "rmsnorm"):
        raise ValueError(f"normalization={normalization!r} is not supported; supported: layernorm, rmsnorm")
    activation = _get(config, "activation", "gelu")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    position = _get(config, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope"):
        raise ValueError(
            f"position_embedding_type={position!r} is not supported; supported: learned_absolute, rope"
        )
    heads = _get(config, "num_attention_heads")
    hidden = _get(config, "hidden_size")
    groups = 1 if _get(config, "multi_query_attention", False) else _get(config, "num_query_groups") or heads
    bias = bool(_get(config, "bias", True))
    architecture = dict(
        num_layers=_get(config, "num_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_get(config, "ffn_hidden_size") or 4 * hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_get(config, "kv_channels") or hidden // heads,
        normalization=normalization,
        activation=_ACTIVATIONS[activation],
        position_embedding_type=position,
        rotary_base=_get(config, "rotary_base", 10000),
        rotary_percentage=float(_get(config, "rotary_percentage", 1.0)),
        share_embeddings_and_output_weights=bool(_get(config, "share_embeddings_and_output_weights", True)),
        bias=bias,
        qkv_bias=bool(_get(config, "qkv_bias", bias)),
        layernorm_epsilon=float(_get(config, "layernorm_epsilon", 1e-5)),
        encoder_seq_length=_get(config, "encoder_seq_length"),
        max_position_embeddings=_get(config, "max_position_embeddings"),
        make_vocab_size_divisible_by=_get(config, "make_vocab_size_divisible_by", 128),
    )
    missing = [key for key in ("num_layers", "hidden_size", "num_attention_heads") if architecture[key] is None]
    if missing:
        raise ValueError(f"model_config.yaml lacks {', '.join(missing)}")
    return {key: value for key, value in architecture.items() if value is not None}


# --------------------------------------------------------------------------- tokenizer


def _artifact(folder: Path, value) -> Path | None:
    """A tokenizer file named in the config: ``nemo:<name>`` inside the archive, or a path."""
    if not value:
        return None
    value = str(value)
    if value.startswith("nemo:"):
        candidate = folder / value[len("nemo:"):]
        return candidate if candidate.exists() else None
    for candidate in (Path(value), folder / Path(value).name):
        if candidate.exists():
            return candidate
    return None


def nemo_tokenizer_dir(folder: str | os.PathLike, config: DictConfig) -> Path:
    """A folder with the checkpoint's tokenizer files, from the config's ``tokenizer`` section."""
    folder = Path(folder)
    section = _get(config, "tokenizer", {}) or {}
    library = _get(section, "library") if section else None
    chat_template = _get(section, "chat_template") if section else None
    extra = {}
    if chat_template:
        extra["tokenizer_config.json"] = json.dumps({"chat_template": str(chat_template)})
    if library == "sentencepiece" or (
        library == "megatron" and _get(section, "type") == "GPTSentencePieceTokenizer"
    ):
        model = _artifact(folder, _get(section, "model"))
        if model is None or not model.is_file():
            raise FileNotFoundError(
                f"the SentencePiece model {_get(section, 'model')!r} named in {CONFIG_NAME} is not in {folder}"
            )
        if _get(section, "special_tokens") or _get(section, "additional_special_tokens"):
            raise ValueError("SentencePiece tokenizers with added special_tokens are not supported")
        return stage_tokenizer_dir({"tokenizer.model": model, **extra})
    if library == "huggingface":
        for value in (_get(section, "model"), _get(section, "type")):
            location = _artifact(folder, value)
            if location is not None and location.is_dir() and (location / "tokenizer.json").is_file():
                return stage_tokenizer_dir({**tokenizer_files_in(location), **extra})
            if location is not None and location.name == "tokenizer.json":
                return stage_tokenizer_dir({"tokenizer.json": location, **extra})
        if (folder / "tokenizer.json").is_file():
            return stage_tokenizer_dir({**tokenizer_files_in(folder), **extra})
        raise FileNotFoundError(
            f"the Hugging Face tokenizer {_get(section, 'type')!r} of this .nemo is not inside it; "
            "pass the folder of its tokenizer.json (model.tokenizer.path / tokenizer_path)"
        )
    raise ValueError(
        f"tokenizer library {library!r} of this .nemo is not supported (supported: sentencepiece, "
        "huggingface); pass a tokenizer folder (model.tokenizer.path / tokenizer_path)"
    )


# --------------------------------------------------------------------------- weights


def nemo_weights_location(folder: str | os.PathLike) -> Path | list[tuple[int, int, Path]]:
    """The distributed-checkpoint folder, or the torch files as ``(tp rank, pp rank, path)``."""
    folder = Path(folder)
    if (folder / WEIGHTS_DIR).is_dir():
        if not (folder / WEIGHTS_DIR / "metadata.json").is_file():
            raise FileNotFoundError(f"{folder / WEIGHTS_DIR} is not a distributed checkpoint (no metadata.json)")
        return folder / WEIGHTS_DIR
    if (folder / WEIGHTS_FILE).is_file():
        return [(0, 0, folder / WEIGHTS_FILE)]
    files = []
    for path in sorted(folder.glob(f"*/{WEIGHTS_FILE}")):
        match = re.fullmatch(r"mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+)", path.parent.name)
        if match:
            tp = int(match.group(1) if match.group(1) is not None else match.group(2))
            files.append((tp, int(match.group(3) or 0), path))
    if not files:
        raise FileNotFoundError(
            f"no weights in {folder}: expected {WEIGHTS_DIR}/ (distributed checkpoint), {WEIGHTS_FILE}, "
            f"or mp_rank_XX/{WEIGHTS_FILE}"
        )
    return files


def _vocab_problem(key: str, got: tuple, want: tuple, vocab_size: int) -> str | None:
    if got[1:] != want[1:]:
        return f"{key} has shape {got} in the checkpoint, the model expects {want} (up to vocab padding)"
    if got[0] < vocab_size:
        return f"{key} has {got[0]} rows in the checkpoint, fewer than the vocabulary ({vocab_size})"
    return None


def check_dist_checkpoint(model_chunks, directory: str | os.PathLike, vocab_size: int) -> None:
    """Raise, on every rank, if the distributed checkpoint lacks a tensor or has one of the wrong shape."""
    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    expected: dict[str, tuple] = {}
    layers: dict[str, int] = {}
    for (key, layer), shape in global_tensor_shapes(model_chunks).items():
        expected[key] = shape
        if layer is not None:
            layers[key] = max(layers.get(key, 0), layer + 1)
    for key, shape in expected.items():
        want = (layers[key], *shape) if key in layers else tuple(shape)
        if KEY_PREFIX + key not in stored:
            raise ValueError(f"the checkpoint in {directory} has no tensor {KEY_PREFIX}{key} (shape {want})")
        got = tuple(stored[KEY_PREFIX + key].global_shape)
        if key in VOCAB_KEYS:
            problem = _vocab_problem(KEY_PREFIX + key, got, want, vocab_size)
        else:
            problem = None if got == want else (
                f"{KEY_PREFIX}{key} has shape {got} in the checkpoint, the model expects {want}"
            )
        if problem:
            raise ValueError(f"{directory}: {problem}")


def _drop_objects(state):
    if isinstance(state, dict):
        return {k: _drop_objects(v) for k, v in state.items() if not isinstance(v, ShardedObject)}
    return state


def load_dist_checkpoint_weights(model_chunks, directory: str | os.PathLike, vocab_size: int) -> None:
    """Load model weights from a NeMo/megatron distributed checkpoint (call on every rank).

    Only tensors are read: per-module ``_extra_state`` (transformer-engine FP8
    metadata in NeMo's checkpoints) means nothing to our modules.
    """
    check_dist_checkpoint(model_chunks, directory, vocab_size)
    request = _drop_objects(model_sharded_state_dict(model_chunks))
    loaded = dist_checkpointing.load(request, str(directory))
    for (name, state), chunk in zip(loaded.items(), model_chunks):
        module = getattr(chunk, "module", chunk)
        state = {key.removeprefix(KEY_PREFIX): value for key, value in state.items()}
        result = module.load_state_dict(state, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"loading {directory}: missing {missing}, unexpected {result.unexpected_keys}")


_LOCAL_TO_CHECKPOINT = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", OUTPUT_LAYER_KEY, "self_attention.linear_qkv.weight",
                    "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def checkpoint_key(name: str) -> tuple[str, int | None] | None:
    """``(checkpoint key, layer)`` of a module state-dict name in either layer-spec spelling."""
    for prefix in ("model.", "module."):
        name = name.removeprefix(prefix)
    if name.endswith("_extra_state") or name.endswith("inv_freq"):
        return None
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if match:
        suffix = _LOCAL_TO_CHECKPOINT.get(match.group(2), match.group(2))
        return LAYER_PREFIX + suffix, int(match.group(1))
    return name, None


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        warnings.warn(
            f"{path} holds objects other than tensors (e.g. transformer-engine extra state); "
            "unpickling it in full: load only checkpoints you trust", stacklevel=3,
        )
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


class TorchStateDictWeights:
    """Full tensors by checkpoint key from NeMo torch state dicts, merged over TP and PP ranks."""

    def __init__(self, files: list[tuple[int, int, Path]], gated: bool):
        self.gated = gated
        by_stage: dict[int, dict[int, dict]] = {}
        for tp, pp, path in files:
            by_stage.setdefault(pp, {})[tp] = _torch_load(path)
        self.pieces: dict[tuple[str, int | None], list[torch.Tensor]] = {}
        offset = 0
        for pp in sorted(by_stage):
            ranks = by_stage[pp]
            if sorted(ranks) != list(range(len(ranks))):
                raise FileNotFoundError(f"pipeline stage {pp} lacks tensor-parallel files: has ranks {sorted(ranks)}")
            stage_layers = 0
            for tp in sorted(ranks):
                for name, tensor in ranks[tp].items():
                    located = checkpoint_key(name) if isinstance(tensor, torch.Tensor) else None
                    if located is None:
                        continue
                    key, layer = located
                    if layer is not None:
                        stage_layers = max(stage_layers, layer + 1)
                        layer += offset
                    self.pieces.setdefault((key, layer), []).append(tensor)
            offset += stage_layers
        self.tp = max(len(r) for r in by_stage.values())
        self._cache: tuple | None = None

    def _partition(self, key: str) -> int | None:
        if self.tp == 1:
            return None
        suffix = key.removeprefix(LAYER_PREFIX)
        if suffix in _COLUMN_PARALLEL:
            return 0
        if suffix in _ROW_PARALLEL:
            return 1
        return None

    def shape(self, key: str, layer: int | None) -> tuple[int, ...] | None:
        parts = self.pieces.get((key, layer))
        if not parts:
            return None
        dim = self._partition(key)
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return tuple(shape)

    def full(self, key: str, layer: int | None) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == (key, layer):
            return self._cache[1]
        parts = self.pieces[(key, layer)]
        dim = self._partition(key)
        if dim is None:
            full = parts[0]
        elif self.gated and key.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            # Each rank holds [its gate rows; its up rows].
            halves = [p.chunk(2, dim=0) for p in parts]
            full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            full = torch.cat(parts, dim=dim)
        self._cache = ((key, layer), full)
        return full

    def check(self, model_chunks, vocab_size: int, tied: bool, where: Path) -> None:
        """Raise, on every rank, on a missing, misshapen or unexpected tensor."""
        expected = global_tensor_shapes(model_chunks)
        for (key, layer), want in expected.items():
            got = self.shape(key, layer)
            name = key if layer is None else f"{key} (layer {layer})"
            if got is None:
                raise ValueError(f"{where} has no tensor {name}")
            problem = _vocab_problem(name, got, want, vocab_size) if key in VOCAB_KEYS else (
                None if got == tuple(want) else f"{name} has shape {got} in the checkpoint, the model expects {want}")
            if problem:
                raise ValueError(f"{where}: {problem}")
        unexpected = [k for k in self.pieces if k not in expected and not (tied and k[0] == OUTPUT_LAYER_KEY)]
        if unexpected:
            key, layer = unexpected[0]
            raise ValueError(
                f"{where} holds {len(unexpected)} tensors the model does not have, e.g. {key} (layer {layer}): "
                "the weights do not match model_config.yaml"
            )

    def read_piece(self, slot: Slot, vocab_size: int) -> torch.Tensor:
        full = self.full(slot.key, slot.layer)
        if slot.key in VOCAB_KEYS:
            rows = torch.zeros(slot.shape, dtype=full.dtype)
            rows[:vocab_size] = full[:vocab_size]
            full = rows
        return full[slot.index]


def load_nemo_weights(model_chunks, folder: str | os.PathLike, architecture: dict, vocab_size: int) -> None:
    """Fill chunks of any TP/PP layout from an unpacked ``.nemo`` (call on every rank)."""
    location = nemo_weights_location(folder)
    if isinstance(location, Path):
        load_dist_checkpoint_weights(model_chunks, location, vocab_size)
        return
    gated = architecture.get("activation") in ("swiglu", "geglu")
    weights = TorchStateDictWeights(location, gated)
    weights.check(model_chunks, vocab_size, bool(architecture.get("share_embeddings_and_output_weights", True)),
                  Path(folder))
    with torch.no_grad():
        fill_from(model_chunks, lambda slot: weights.read_piece(slot, vocab_size))
    barrier()
