"""Hugging Face checkpoints (Llama, Mistral, Qwen2) in and out of megatron-core GPT models.

Import reads ``config.json`` into our NeMo-named architecture keys and streams
``*.safetensors`` into model chunks of any TP/PP layout: each rank reads, through
``safetensors.safe_open`` slices, only the rows and columns it keeps. Export
gathers full tensors to rank 0 and writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads (safetensors,
``config.json``, tokenizer files), without the vocab padding.

Name map, per layer ``i`` (HF ``model.layers.i.`` -> megatron ``decoder.layers.i.``):

=================================  =============================================
``input_layernorm.weight``         ``self_attention.linear_qkv.layer_norm_weight``
``self_attn.{q,k,v}_proj.*``       ``self_attention.linear_qkv.*``: per query
                                   group g, [q heads of g; k_g; v_g]
``self_attn.o_proj.*``             ``self_attention.linear_proj.*``
``post_attention_layernorm.weight``  ``mlp.linear_fc1.layer_norm_weight``
``mlp.{gate,up}_proj.*``           ``mlp.linear_fc1.*`` = [gate; up] (megatron's
                                   gated unit applies the activation to the
                                   first half)
``mlp.down_proj.*``                ``mlp.linear_fc2.*``
=================================  =============================================

plus ``model.embed_tokens.weight`` / ``embedding.word_embeddings.weight``,
``model.norm.weight`` / ``decoder.final_layernorm.weight`` and ``lm_head.weight``
/ ``output_layer.weight`` (absent when the embeddings are tied). The megatron
names are checkpoint keys (transformer-engine spelling), which the local layer
spec maps onto its own modules.

Both directions go through one table (:meth:`HFTensorMap.segments`): each megatron
tensor is a stack of row ranges of HF tensors, so an import followed by an
export gives back the original tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_dpo.parallel.collectives import barrier, is_rank0, raise_on_every_rank
from nemo_dpo.checkpoint.tokenizer_files import TOKENIZER_FILES, load_tokenizer_dir
from nemo_dpo.checkpoint.weight_transfer import (
    EMBEDDING_KEY,
    LAYER_PREFIX,
    OUTPUT_LAYER_KEY,
    Slot,
    fill_from,
    gather_full_tensors,
    global_tensor_shapes,
)

# HF "architectures" entry -> model_type
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# The source model's config.json, kept beside the tokenizer so an export can
# restore everything that is not architecture (model_type, special token ids,
# sliding window, ...).
SOURCE_CONFIG_NAME = "hf_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------- config


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def hf_architecture_name(config: dict) -> str:
    """The config's ``architectures`` entry (or one derived from ``model_type``), checked."""
    names = config.get("architectures") or []
    if not names:
        by_type = {model_type: name for name, model_type in SUPPORTED_ARCHITECTURES.items()}
        names = [by_type.get(config.get("model_type"), f"model_type={config.get('model_type')!r}")]
    name = names[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Hugging Face architecture {name} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    # transformers < 5 writes rope_theta / rope_scaling; 5.x writes rope_parameters.
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and parameters.get("rope_type", "default") != "default":
        scaling = parameters
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def architecture_from_hf_config(config: dict) -> dict:
    """Our NeMo-named architecture keys for a Llama / Mistral / Qwen2 ``config.json``."""
    name = hf_architecture_name(config)
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{name} with hidden_act={config['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_settings(config)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise ValueError(
            f"{name} uses RoPE scaling {kind!r} (e.g. Llama 3.1+), which the nemo-dpo model builder "
            "does not implement yet; only unscaled RoPE (rope_type 'default') is supported"
        )
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    if name == "Qwen2ForCausalLM":
        if config.get("use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported (full causal attention only)")
        bias, qkv_bias = False, True
    else:
        attention_bias = bool(config.get("attention_bias", False))
        mlp_bias = bool(config.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(
                f"{name} with attention_bias={attention_bias} and mlp_bias={mlp_bias} is not supported: "
                "megatron-core puts biases on all linear layers or on none (Qwen2's q/k/v-only aside)"
            )
        bias = qkv_bias = attention_bias
    window = config.get("sliding_window")
    if window is not None and name == "MistralForCausalLM":
        warnings.warn(
            f"{name} has sliding_window={window}; nemo-dpo attends over the full causal context, "
            f"which is exact for sequences of up to {window} tokens",
            stacklevel=2,
        )
    return dict(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=config.get("head_dim") or hidden // heads,
        normalization="rmsnorm",
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=theta,
        rotary_percentage=float(config.get("partial_rotary_factor", 1.0)),
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        bias=bias,
        qkv_bias=qkv_bias,
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def _exportable_family(architecture: dict) -> str:
    """``llama`` or ``qwen2``: the HF family that expresses ``architecture``, or an error saying why none does."""
    problems = []
    # Absent keys take the model builder's defaults.
    required = dict(normalization=("layernorm", "rmsnorm"), position_embedding_type=("learned_absolute", "rope"),
                    activation=("gelu", "swiglu"))
    for key, (default, needed) in required.items():
        value = architecture.get(key, default)
        if value != needed and not (key == "activation" and value == "fast-swiglu"):
            problems.append(f"{key}={value!r} (needs {needed!r})")
    if float(architecture.get("rotary_percentage", 1.0)) != 1.0:
        problems.append(f"rotary_percentage={architecture['rotary_percentage']} (needs 1.0)")
    if problems:
        raise ValueError("this model cannot be exported as Llama/Mistral/Qwen2: " + ", ".join(problems))
    bias = bool(architecture.get("bias", True))
    qkv_bias = bool(architecture.get("qkv_bias", bias))
    if qkv_bias and not bias:
        return "qwen2"
    if qkv_bias != bias:
        raise ValueError("bias=true with qkv_bias=false has no Hugging Face equivalent")
    return "llama"


def hf_config_from_architecture(
    architecture: dict,
    vocab_size: int,
    dtype: torch.dtype,
    template: dict | None = None,
    special_token_ids: dict | None = None,
) -> dict:
    """A ``config.json`` for ``architecture``.

    ``template`` (the source model's own config.json) keeps everything that is
    not architecture, e.g. its ``model_type`` (Mistral stays Mistral), special
    token ids and sliding window; without one a Llama or Qwen2 config is made.
    """
    family = _exportable_family(architecture)
    if template is not None:
        name = hf_architecture_name(template)
        if (SUPPORTED_ARCHITECTURES[name] == "qwen2") != (family == "qwen2"):
            raise ValueError(f"the source config is {name}, but the model's biases make it a {family} model")
        config = json.loads(json.dumps(template))
    else:
        config = {
            "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
            "model_type": family,
            **(special_token_ids or {}),
        }
    hidden = architecture["hidden_size"]
    heads = architecture["num_attention_heads"]
    bias = bool(architecture.get("bias", True))
    theta = float(architecture.get("rotary_base", 10000))
    config.update(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=architecture.get("ffn_hidden_size") or 4 * hidden,
        num_hidden_layers=architecture["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=architecture.get("num_query_groups") or heads,
        head_dim=architecture.get("kv_channels") or hidden // heads,
        hidden_act="silu",
        rms_norm_eps=float(architecture.get("layernorm_epsilon", 1e-5)),
        max_position_embeddings=architecture.get("max_position_embeddings")
        or architecture.get("encoder_seq_length"),
        tie_word_embeddings=bool(architecture.get("share_embeddings_and_output_weights", True)),
        rope_theta=theta,
        torch_dtype=_DTYPE_NAMES[dtype],
    )
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"]["rope_theta"] = theta
    config.pop("dtype", None)
    if family == "llama":
        config.update(attention_bias=bias, mlp_bias=bias)
    else:
        config.setdefault("use_sliding_window", False)
    return config


# --------------------------------------------------------------------------- name map


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, start + length)`` of HF tensor ``name`` (``None``: vocab padding, zeros)."""

    name: str | None
    start: int
    length: int


class HFTensorMap:
    """Which HF tensors make up each megatron checkpoint tensor, for one architecture."""

    def __init__(self, architecture: dict, vocab_size: int):
        a = architecture
        self.hidden = a["hidden_size"]
        self.heads = a["num_attention_heads"]
        self.groups = a.get("num_query_groups") or self.heads
        self.head_dim = a.get("kv_channels") or self.hidden // self.heads
        self.ffn = a.get("ffn_hidden_size") or 4 * self.hidden
        self.num_layers = a["num_layers"]
        self.tied = bool(a.get("share_embeddings_and_output_weights", True))
        self.bias = bool(a.get("bias", True))
        self.qkv_bias = bool(a.get("qkv_bias", self.bias))
        self.vocab_size = vocab_size
        self._hf_shapes: dict | None = None
        if self.heads % self.groups:
            raise ValueError(f"num_attention_heads={self.heads} is not a multiple of num_query_groups={self.groups}")

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this architecture holds, with its shape."""
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d, self.groups * d
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (self.ffn, h),
                p + "mlp.up_proj.weight": (self.ffn, h),
                p + "mlp.down_proj.weight": (h, self.ffn),
            })
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.bias:
                shapes.update({p + "self_attn.o_proj.bias": (h,), p + "mlp.gate_proj.bias": (self.ffn,),
                               p + "mlp.up_proj.bias": (self.ffn,), p + "mlp.down_proj.bias": (h,)})
        return shapes

    def segments(self, key: str, layer: int | None, rows: int) -> list[Segment]:
        """The megatron tensor ``key`` (of ``layer``, ``rows`` rows) as a stack of HF row ranges."""
        if key in (EMBEDDING_KEY, OUTPUT_LAYER_KEY):
            name = "model.embed_tokens.weight" if key == EMBEDDING_KEY or self.tied else "lm_head.weight"
            if rows < self.vocab_size:
                raise ValueError(f"{key} has {rows} rows, fewer than the vocabulary ({self.vocab_size})")
            return [Segment(name, 0, self.vocab_size), Segment(None, 0, rows - self.vocab_size)]
        if key == "decoder.final_layernorm.weight":
            return [Segment("model.norm.weight", 0, self.hidden)]
        if layer is None or not key.startswith(LAYER_PREFIX):
            raise ValueError(f"{key} has no Hugging Face counterpart")
        suffix = key[len(LAYER_PREFIX):]
        p = f"model.layers.{layer}."
        kind = suffix.rsplit(".", 1)[-1]
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            d, per_group = self.head_dim, self.heads // self.groups
            stack = []
            for g in range(self.groups):
                stack += [Segment(p + f"self_attn.q_proj.{kind}", g * per_group * d, per_group * d),
                          Segment(p + f"self_attn.k_proj.{kind}", g * d, d),
                          Segment(p + f"self_attn.v_proj.{kind}", g * d, d)]
            return stack
        if suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
            return [Segment(p + f"mlp.gate_proj.{kind}", 0, self.ffn), Segment(p + f"mlp.up_proj.{kind}", 0, self.ffn)]
        single = {
            "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", self.hidden),
            "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", self.hidden),
            "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", self.hidden),
            "self_attention.linear_proj.bias": ("self_attn.o_proj.bias", self.hidden),
            "mlp.linear_fc2.weight": ("mlp.down_proj.weight", self.hidden),
            "mlp.linear_fc2.bias": ("mlp.down_proj.bias", self.hidden),
        }
        if suffix not in single:
            raise ValueError(f"{key} has no Hugging Face counterpart")
        name, length = single[suffix]
        return [Segment(p + name, 0, length)]

    def to_hf(self, key: str, layer: int | None, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a full megatron tensor into its HF tensors (vocab padding dropped)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        row = 0
        for seg in self._checked(key, layer, full.shape[0]):
            if seg.name is not None:
                pieces.setdefault(seg.name, []).append(full[row:row + seg.length])
            row += seg.length
        return {name: torch.cat(parts).contiguous() for name, parts in pieces.items()}

    def check_model_tensor(self, key: str, layer: int | None, shape: tuple[int, ...]) -> None:
        """Raise unless the model's full tensor ``key`` is what this architecture makes of HF tensors."""
        hf_shapes = self.hf_shapes_cache
        for seg in self._checked(key, layer, shape[0]):
            if seg.name is not None and hf_shapes[seg.name][1:] != tuple(shape[1:]):
                raise ValueError(
                    f"{key} (layer {layer}): the model's tensor has shape {tuple(shape)}, which does not "
                    f"match {seg.name} {hf_shapes[seg.name]}; build the model from the checkpoint's architecture"
                )

    @property
    def hf_shapes_cache(self) -> dict[str, tuple[int, ...]]:
        if self._hf_shapes is None:
            self._hf_shapes = self.hf_shapes()
        return self._hf_shapes

    def _checked(self, key: str, layer: int | None, rows: int) -> list[Segment]:
        stack = self.segments(key, layer, rows)
        total = sum(seg.length for seg in stack)
        if total != rows:
            where = key if layer is None else f"{key} (layer {layer})"
            raise ValueError(
                f"{where}: the model's tensor has {rows} rows but the checkpoint's architecture gives "
                f"{total}; build the model from the checkpoint's architecture"
            )
        return stack

    def read_piece(self, slot: Slot, read_rows) -> torch.Tensor:
        """This slot's values, from ``read_rows(name, start, stop, column_index)`` calls."""
        rows, columns = slot.index[0], slot.index[1:]
        parts, base = [], 0
        for seg in self._checked(slot.key, slot.layer, slot.shape[0]):
            lo, hi = max(rows.start, base), min(rows.stop, base + seg.length)
            if lo < hi:
                if seg.name is None:
                    width = [c.stop - c.start for c in columns]
                    parts.append(torch.zeros([hi - lo, *width], dtype=slot.data.dtype))
                else:
                    start = seg.start + lo - base
                    parts.append(read_rows(seg.name, start, start + hi - lo, columns))
            base += seg.length
        return torch.cat([p.to(slot.data.dtype) for p in parts])


# --------------------------------------------------------------------------- reading


class SafetensorsFolder:
    """The tensors of a folder of ``*.safetensors`` files (with or without an index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} lists weight files that are missing from {self.folder}: {', '.join(missing)}"
                )
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                    p.name for p in self.folder.glob("*.pt*"))
                hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
                raise FileNotFoundError(f"no *.safetensors weight files in {self.folder}{hint}")
            weight_map = None
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    continue
                self.file_of[name] = file
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        if weight_map is not None:
            absent = [name for name, file in weight_map.items() if name not in self.file_of]
            if absent:
                raise FileNotFoundError(
                    f"{SAFETENSORS_INDEX} places {len(absent)} tensors in files that do not hold them, "
                    f"e.g. {absent[0]} in {weight_map[absent[0]]}"
                )

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def read_rows(self, name: str, start: int, stop: int, columns: tuple[slice, ...]) -> torch.Tensor:
        return self._open(self.file_of[name]).get_slice(name)[(slice(start, stop), *columns)]

    def close(self) -> None:
        self._handles.clear()

    def check_against(self, expected: dict[str, tuple[int, ...]], config_note: str) -> None:
        """Raise on a missing, misshapen or unexpected tensor, naming it."""
        missing = [name for name in expected if name not in self.shapes]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(
                f"{self.folder} lacks weights that {config_note} calls for: {', '.join(missing[:3])}{more}"
            )
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise ValueError(
                    f"tensor {name} in {self.file_of[name]} has shape {list(self.shapes[name])}, but "
                    f"{config_note} implies {list(shape)}"
                )
        unexpected = [
            name for name in self.shapes
            if name not in expected and not name.endswith(_IGNORED_SUFFIXES) and name != "lm_head.weight"
        ]
        if unexpected:
            raise ValueError(
                f"{self.folder} holds tensors that {config_note} does not describe, e.g. "
                f"{', '.join(sorted(unexpected)[:3])}: the weights do not match the config"
            )


def check_hf_weights(folder: str | os.PathLike, architecture: dict, vocab_size: int) -> None:
    """Raise on a missing weight file, or a missing, misshapen or unexpected tensor (reads headers only)."""
    files = SafetensorsFolder(folder)
    try:
        files.check_against(HFTensorMap(architecture, vocab_size).hf_shapes(), str(Path(folder) / "config.json"))
    finally:
        files.close()


def load_hf_weights(model_chunks, folder: str | os.PathLike, architecture: dict, vocab_size: int) -> None:
    """Fill chunks of any TP/PP layout from an HF safetensors folder (call on every rank).

    Every rank first checks the whole model and all file headers against the
    architecture (so all ranks fail alike), then reads only the slices it keeps.
    """
    tensor_map = HFTensorMap(architecture, vocab_size)
    for (key, layer), shape in global_tensor_shapes(model_chunks).items():
        tensor_map.check_model_tensor(key, layer, shape)
    files = SafetensorsFolder(folder)
    try:
        files.check_against(tensor_map.hf_shapes(), str(Path(folder) / "config.json"))
        fill_from(model_chunks, lambda slot: tensor_map.read_piece(slot, files.read_rows))
    finally:
        files.close()
    barrier()


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Accumulates tensors into safetensors files of at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.current, str(self.folder / f"part-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        if self.current or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            os.replace(self.folder / "part-00000.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}.safetensors", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _special_token_ids(tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is None:
        return {}
    try:
        tokenizer = load_tokenizer_dir(tokenizer_dir)
    except FileNotFoundError:
        return {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {key: value for key, value in ids.items() if value is not None}


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer (and generation) files of ``source`` into ``destination``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def export_hf(
    model_chunks,
    architecture: dict,
    vocab_size: int,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the model as a Hugging Face folder (collective: call on every rank).

    Works from any TP/PP layout: pieces are gathered to rank 0 one tensor at a
    time. ``vocab_size`` is the real vocabulary (padding rows are dropped);
    ``dtype`` defaults to that of most of the model's weights. Tokenizer and generation files in
    ``tokenizer_dir`` are copied; an ``hf_config.json`` there (the imported
    model's config.json) is the template of the new ``config.json``. The folder
    appears complete or not at all (written under ``<out_dir>.tmp``, renamed).
    """
    out = Path(out_dir)
    rank0 = is_rank0()
    # Everything that can be refused is refused on every rank, before any tensor moves.
    _exportable_family(architecture)
    tensor_map = HFTensorMap(architecture, vocab_size)
    for (key, layer), shape in global_tensor_shapes(model_chunks).items():
        tensor_map.check_model_tensor(key, layer, shape)
    staging = out.with_name(out.name + ".tmp")
    # One dtype for the whole file: the requested one, else that of most weights (norms may be fp32).
    dtypes = [p.dtype for chunk in model_chunks for p in chunk.parameters()]
    target_dtype = dtype or max(set(dtypes), key=dtypes.count)
    tokenizer_path = Path(tokenizer_dir) if tokenizer_dir is not None else None
    error, config = None, None
    if rank0:
        try:
            template = None
            if tokenizer_path is not None and (tokenizer_path / SOURCE_CONFIG_NAME).is_file():
                template = json.loads((tokenizer_path / SOURCE_CONFIG_NAME).read_text(encoding="utf-8"))
            config = hf_config_from_architecture(
                architecture, vocab_size, target_dtype, template, _special_token_ids(tokenizer_path)
            )
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except (OSError, ValueError) as err:
            error = err
    raise_on_every_rank(error)
    writer = _ShardWriter(staging, max_shard_bytes) if rank0 else None
    for key, layer, full in gather_full_tensors(model_chunks):
        for name, tensor in tensor_map.to_hf(key, layer, full).items():
            writer.add(name, tensor.to(target_dtype))
    if rank0:
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer_path is not None:
            copy_tokenizer_files(tokenizer_path, staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    barrier()
    return out


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()
