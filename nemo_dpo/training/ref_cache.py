"""The reference log-prob cache of a run (``model.dpo.precompute_ref_log_probs``) and what keys it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.algorithms.ref_logprob_cache import RefLogprobCache, fingerprint_files, fingerprint_named_tensors
from nemo_dpo.interop.weight_transfer import gather_full_tensors
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.parallel.collectives import broadcast_object, is_rank0
from nemo_dpo.training.data import DEFAULT_DATA_DIR


def _existing_files(value) -> list[Path]:
    """The existing files named anywhere in a ``data_prefix`` entry (a path, a list, a mapping)."""
    if isinstance(value, (str, Path)):
        return [Path(value)] if Path(value).is_file() else []
    if isinstance(value, dict) or OmegaConf.is_dict(value):
        return [f for item in value.values() for f in _existing_files(item)]
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [f for item in value for f in _existing_files(item)]
    return []


def reference_weights_fingerprint(model) -> str:
    """sha256 of the full weight tensors, gathered from every rank, the same for every layout; on every rank.

    The tensors come in the canonical order of a layout-free export (embedding,
    layers by global index, final norm, output layer) under their global
    names, so the same weights at another TP/PP/DP layout, or read from another
    format, give the same fingerprint. Collective. Call while the policy's
    weights still equal the reference's (before a resumed policy is loaded).
    """
    named = ((f"{key}@{layer}", tensor) for key, layer, tensor in gather_full_tensors(model.model))
    weights = fingerprint_named_tensors(named) if is_rank0() else None
    for _ in named:  # ranks other than 0 send their pieces while iterating
        pass
    return broadcast_object(weights)


def build_ref_logprob_cache(cfg: DictConfig, model, tokenizer_dir, log_dir: Path) -> RefLogprobCache | None:
    """The reference log-prob cache of ``model.dpo.precompute_ref_log_probs`` (None when off).

    Parts: the reference weights (:func:`reference_weights_fingerprint`), the
    tokenizer's files, the data files of each split, and the settings that
    shape the tokens (``model.data`` but its paths, precision, architecture);
    the cache adds the pairs' token ids and the batching. Call before a resumed
    policy's weights are loaded. Collective.
    """
    model_cfg = cfg.model
    if not model.dpo.precompute_ref_log_probs or model.preference_loss.reference_free:
        return None  # off, or nothing to cache: a reference-free loss never reads the reference
    weights = reference_weights_fingerprint(model)
    tokenizer = fingerprint_files([tokenizer_dir]) if tokenizer_dir and Path(tokenizer_dir).exists() else "none"
    data_cfg = OmegaConf.to_container(model_cfg.data, resolve=True)
    settings = {key: value for key, value in data_cfg.items() if key not in ("data_prefix", "num_workers")}
    settings.update(precision=str(model_cfg.get("precision")),
                    architecture=GPTArchitecture.from_config(model_cfg).to_dict())
    prefix = model_cfg.data.get("data_prefix")
    split_parts = {}
    for split in ("train", "validation"):
        files = _existing_files(prefix.get(split) if OmegaConf.is_dict(prefix) else prefix)
        if not files and (prefix is None or (OmegaConf.is_dict(prefix) and prefix.get("train") is None)):
            files = [DEFAULT_DATA_DIR / f"{split}.jsonl"]
        # The items' token ids are hashed too (by the cache): this part names a changed file.
        split_parts[split] = {"data": fingerprint_files(f for f in files if f.is_file())}
    directory = model.dpo.ref_log_probs_cache_dir or log_dir / "ref_log_probs"
    return RefLogprobCache(directory, {"weights": weights, "tokenizer": tokenizer,
                                       "settings": json.dumps(settings, sort_keys=True, default=str)}, split_parts)
