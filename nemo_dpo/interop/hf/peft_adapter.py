"""LoRA adapters of model chunks of any TP/PP layout as a PEFT adapter folder.

``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's names
(``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight``...), which
``peft.PeftModel.from_pretrained`` loads onto the Hugging Face base model. A
fused adapter becomes one per projection: the QKV adapter's ``A`` is every
projection's ``lora_A`` and its ``B`` rows are split as the base weight's rows
(per query group for q, k and v); ``linear_fc1``'s as gate and up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nemo_dpo.interop.hf.export import current_umask
from nemo_dpo.interop.hf.families import family_for_architecture
from nemo_dpo.interop.hf.tensor_map import HFTensorMap
from nemo_dpo.interop.weight_transfer import gather_full_tensors
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.models.nlp.gpt.lora import adapter_sharded_state_dict, lora_of
from nemo_dpo.parallel.collectives import barrier, is_rank0, raise_on_every_rank

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_adapter_tensors(full: dict[tuple[str, int], torch.Tensor], tensor_map: HFTensorMap,
                         layer_numbers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """PEFT's tensors from full adapters keyed ``(checkpoint key, index among the adapted layers)``."""
    tensors = {}
    for (key, index), tensor in full.items():
        if not key.endswith(".lora.linear_out"):
            continue
        base_key = key.removesuffix(".lora.linear_out") + ".weight"
        layer = layer_numbers[index] - 1
        a = full[(key.removesuffix("linear_out") + "linear_in", index)]
        for name, b in tensor_map.to_hf(base_key, layer, tensor).items():
            module = name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.clone()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    return tensors


def export_peft_adapter(model_chunks, architecture: dict, vocab_size: int, out_dir: str | os.PathLike,
                        base_model: str | None = None, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
    """Write the chunks' LoRA adapters as a PEFT adapter folder (collective: call on every rank).

    ``base_model`` is recorded as ``base_model_name_or_path``. The folder
    appears complete or not at all (written under ``<out_dir>.tmp``, renamed).
    """
    out = Path(out_dir)
    arch = GPTArchitecture.from_config(architecture)
    family_for_architecture(arch)
    lora = lora_of(model_chunks[0])
    if lora is None:
        raise ValueError("the model has no LoRA adapters to export")
    settings = lora.settings
    staging = out.with_name(out.name + ".tmp")
    error = None
    if is_rank0():
        try:
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as err:
            error = err
    raise_on_every_rank(error)
    full = {}
    for key, index, tensor in gather_full_tensors(model_chunks, adapter_sharded_state_dict(model_chunks)):
        full[(key, index)] = tensor
    if is_rank0():
        tensors = peft_adapter_tensors(full, HFTensorMap(arch, vocab_size), lora.selected_layers)
        if dtype is not None:
            tensors = {name: t.to(dtype) for name, t in tensors.items()}
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        modules = sorted({name.rsplit(".", 3)[-3] for name in tensors})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.adapter_dim, "lora_alpha": settings.alpha, "lora_dropout": settings.adapter_dropout,
            "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "init_lora_weights": True,
            "layers_to_transform": (None if settings.layer_selection is None
                                    else [n - 1 for n in settings.layer_selection]),
        }
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # safetensors creates its files 0600; an adapter is shared like any other file.
        os.chmod(staging / ADAPTER_WEIGHTS, 0o666 & ~current_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    barrier()
    return out
