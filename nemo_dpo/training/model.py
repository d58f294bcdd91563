"""The policy model, its weights and tokenizer from ``pretrained_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.interop import open_pretrained
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel


def check_peft(model_cfg: DictConfig) -> None:
    """Refuse parameter-efficient fine-tuning (``model.peft``): only full fine-tuning is supported yet."""
    peft = model_cfg.get("peft") or {}
    scheme = peft.get("peft_scheme") or "none"
    if scheme != "none" or peft.get("restore_from_path") is not None:
        raise NotImplementedError(
            f"model.peft.peft_scheme={scheme!r}: LoRA / PEFT is not supported yet; use peft_scheme: none "
            "(full fine-tuning) and restore_from_path: null"
        )


def open_checkpoint(restore_path, tokenizer_path=None, trust_pickled_objects: bool = False):
    """The ``PretrainedSource`` at ``restore_path`` (the embedded default model when null)."""
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


def load_pretrained_model(cfg: DictConfig, model_cls=None) -> tuple[MegatronGPTDPOModel, object, Path]:
    """``(model, tokenizer, tokenizer_dir)`` from ``pretrained_checkpoint.restore_from_path``.

    ``model_cls``: ``MegatronGPTDPOModel`` (None) or a subclass of it.

    Accepts a nemo-dpo folder, a Hugging Face folder or a .nemo file (the
    embedded default model when null). The checkpoint's architecture is merged
    into ``cfg.model`` in place, as NeMo's ``load_and_override_model_config``
    does. Collective: call on every rank after ``initialize_parallel``.
    """
    pretrained = cfg.pretrained_checkpoint
    source = open_checkpoint(pretrained.restore_from_path, (cfg.model.get("tokenizer") or {}).get("path"),
                             pretrained.get("trust_pickled_objects", False))
    model = load_model_from_source(model_cls or MegatronGPTDPOModel, cfg.model, source)
    return model, model.tokenizer, source.tokenizer_dir
