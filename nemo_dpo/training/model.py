"""The policy model, its weights and tokenizer from ``pretrained_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.interop import open_pretrained
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel


def load_pretrained_model(cfg: DictConfig) -> tuple[MegatronGPTDPOModel, object, Path]:
    """``(model, tokenizer, tokenizer_dir)`` from ``pretrained_checkpoint.restore_from_path``.

    Accepts a nemo-dpo folder, a Hugging Face folder or a .nemo file (the
    embedded default model when null). The checkpoint's architecture is merged
    into ``cfg.model`` in place, as NeMo's ``load_and_override_model_config``
    does. Collective: call on every rank after ``initialize_parallel``.
    """
    model_cfg = cfg.model
    pretrained = cfg.pretrained_checkpoint
    source = open_pretrained(
        pretrained.restore_from_path or DEFAULT_MODEL_DIR, tokenizer_path=(model_cfg.get("tokenizer") or {}).get("path"),
        trust_pickled_objects=pretrained.get("trust_pickled_objects", False),
    )
    with open_dict(model_cfg):
        model_cfg.merge_with(source.architecture)
        model_cfg.vocab_size = source.vocab_size
    chunks = build_gpt_model(model_cfg, source.vocab_size)
    source.load_weights(chunks)
    model = MegatronGPTDPOModel(model_cfg, source.vocab_size, model_chunks=chunks)
    return model, source.load_tokenizer(), source.tokenizer_dir
