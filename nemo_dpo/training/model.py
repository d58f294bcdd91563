"""The policy model, its weights and tokenizer from ``pretrained_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_dpo.checkpoint.adapters import is_adapter_folder, load_adapters, read_lora_config
from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.interop import open_pretrained
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.lora import LoRASettings
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel


def check_peft(model_cfg: DictConfig) -> LoRASettings | None:
    """``model.peft`` checked before work starts: the LoRA settings, or None for full fine-tuning.

    ``restore_from_path`` must be a LoRA adapter folder (a LoRA run's checkpoint
    or ``final_model``) and needs ``peft_scheme: lora``; ``restore_from_ckpt`` is
    refused (resume with ``exp_manager.resume_from_checkpoint``).
    """
    peft = model_cfg.get("peft") or {}
    settings = LoRASettings.from_config(model_cfg)
    restore = peft.get("restore_from_path")
    if restore is not None:
        if settings is None:
            raise ValueError("model.peft.restore_from_path starts from saved LoRA adapters; it needs "
                             "model.peft.peft_scheme=lora")
        if not is_adapter_folder(restore):
            raise FileNotFoundError(f"model.peft.restore_from_path={restore}: not a LoRA adapter folder "
                                    "(a LoRA run's checkpoint or final_model, with lora.json)")
    for key in ("checkpoint_dir", "checkpoint_name"):
        if (peft.get("restore_from_ckpt") or {}).get(key) is not None:
            raise ValueError(f"model.peft.restore_from_ckpt.{key}: resume a LoRA run with "
                             "exp_manager.resume_from_checkpoint (its checkpoints hold the adapters and their "
                             "optimizer state); leave restore_from_ckpt null")
    return settings


def open_checkpoint(restore_path, tokenizer_path=None, trust_pickled_objects: bool = False):
    """The ``PretrainedSource`` at ``restore_path`` (the embedded default model when null).

    A LoRA adapter folder holds no base weights: it is refused, naming what to set instead.
    """
    if restore_path is not None and is_adapter_folder(restore_path):
        base = read_lora_config(restore_path)["base_checkpoint"]
        raise ValueError(
            f"pretrained_checkpoint.restore_from_path={restore_path} holds LoRA adapters, not a model: set it to "
            f"their base ({base or 'null: the embedded default'}) and model.peft.restore_from_path to {restore_path}")
    return open_pretrained(restore_path or DEFAULT_MODEL_DIR, tokenizer_path=tokenizer_path,
                           trust_pickled_objects=trust_pickled_objects)


def merge_checkpoint_config(model_cfg: DictConfig, source) -> None:
    """Merge the checkpoint's architecture and vocabulary size into ``model_cfg``, in place (checkpoint wins)."""
    with open_dict(model_cfg):
        model_cfg.merge_with(source.architecture)
        model_cfg.vocab_size = source.vocab_size


def load_model_from_source(model_cls, model_cfg: DictConfig, source):
    """``model_cls`` (``MegatronGPTDPOModel`` or a subclass) over ``source``'s weights, with ``.tokenizer`` set.

    ``model_cfg`` gets the checkpoint's architecture first. Collective: call on
    every rank after ``initialize_parallel``.
    """
    merge_checkpoint_config(model_cfg, source)
    chunks = build_gpt_model(model_cfg, source.vocab_size)
    source.load_weights(chunks)
    model = model_cls(model_cfg, source.vocab_size, model_chunks=chunks)
    model.tokenizer = source.load_tokenizer()
    return model


def restore_adapters(model, model_cfg: DictConfig) -> None:
    """Start from the adapters of ``model.peft.restore_from_path`` when it is set (collective)."""
    restore = (model_cfg.get("peft") or {}).get("restore_from_path")
    if restore is not None:
        load_adapters(model.model, restore)


def load_pretrained_model(cfg: DictConfig, model_cls=None) -> tuple[MegatronGPTDPOModel, object, Path]:
    """``(model, tokenizer, tokenizer_dir)`` from ``pretrained_checkpoint.restore_from_path``.

    ``model_cls``: ``MegatronGPTDPOModel`` (None) or a subclass of it.

    Accepts a nemo-dpo folder, a Hugging Face folder or a .nemo file (the
    embedded default model when null). The checkpoint's architecture is merged
    into ``cfg.model`` in place, as NeMo's ``load_and_override_model_config``
    does. With LoRA the adapters of ``model.peft.restore_from_path`` are loaded
    when set. Collective: call on every rank after ``initialize_parallel``.
    """
    pretrained = cfg.pretrained_checkpoint
    source = open_checkpoint(pretrained.restore_from_path, (cfg.model.get("tokenizer") or {}).get("path"),
                             pretrained.get("trust_pickled_objects", False))
    model = load_model_from_source(model_cls or MegatronGPTDPOModel, cfg.model, source)
    # Recorded in LoRA checkpoints (null: the embedded default model).
    model.base_checkpoint = None if pretrained.restore_from_path is None else str(pretrained.restore_from_path)
    restore_adapters(model, cfg.model)
    return model, model.tokenizer, source.tokenizer_dir
