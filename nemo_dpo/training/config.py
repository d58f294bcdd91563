"""The run configuration: ``conf/gpt_dpo.yaml`` plus Hydra-style overrides, without a Hydra app."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from nemo_dpo.conf import CONFIG_DIR, CONFIG_NAME
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.optim.scheduler import check_schedule_config
from nemo_dpo.training.nemo_keys import NEMO_KEYS, WARNED, select_value, rule_for, suggest

log = logging.getLogger(__name__)


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR,
                   config_name: str = CONFIG_NAME) -> DictConfig:
    """The config ``python examples/train_gpt_dpo.py *overrides`` would run with.

    Uses Hydra's compose API, so the override grammar (``a.b=c``, ``+new=1``,
    quoting) is Hydra's own. Hydra's global state is cleared again on return, so
    this may be called any number of times in one process.
    """
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


# Interpolation functions NeMo's configs use (``${multiply:a,b}`` in NeMo Aligner's gpt_dpo.yaml).
for _name, _fn in (("multiply", lambda a, b: a * b), ("sum", lambda *values: sum(values))):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _key_paths(node, prefix: str = "") -> dict[str, object]:
    """``dotted.key -> value`` for every key of a (nested) plain dict, parents before their children."""
    paths = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths[path] = value
        if isinstance(value, dict):
            paths.update(_key_paths(value, path + "."))
    return paths


def _reference() -> dict:
    """``conf/gpt_dpo.yaml`` as a plain, unresolved dict (without Hydra's own keys)."""
    ref = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml"), resolve=False)
    return {key: value for key, value in ref.items() if key not in ("defaults", "hydra")}


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class ConfigWarning:
    """A key accepted with no effect: ``keys`` (one pattern's keys) and the one-line ``message``."""

    keys: tuple[str, ...]
    message: str


def check_config_keys(cfg: DictConfig, reference: DictConfig | None = None) -> list[ConfigWarning]:
    """Sort every key of ``cfg`` by :data:`~nemo_dpo.training.nemo_keys.NEMO_KEYS` and the reference YAML.

    Raises one line naming unknown keys (with the closest known key) or refused
    ones (with the reason); returns the warnings for keys accepted with no effect.
    ``reference`` is the config whose keys are our own (default: ``conf/gpt_dpo.yaml``).
    Below a key whose reference value is a plain value or null, any content is
    the value's own business and is not checked.
    """
    ref = _reference() if reference is None else OmegaConf.to_container(reference, resolve=False)
    known = _key_paths(ref)
    patterns = list(NEMO_KEYS)
    done: list[str] = []  # prefixes whose content is already accounted for
    unknown, refusals = [], {}
    warned: dict[str, list[str]] = {}
    for path, value in _key_paths(OmegaConf.to_container(cfg, resolve=False)).items():
        if path.split(".")[0] == "hydra" or any(path.startswith(prefix) for prefix in done):
            continue
        found = rule_for(path)
        if found is None and path in known:
            if not isinstance(known[path], dict):
                done.append(path + ".")
            continue
        if found is None:
            intermediate = isinstance(value, dict) and any(
                k.startswith(path + ".") for k in (*known, *patterns))
            if not intermediate:
                unknown.append(path)
            continue
        pattern, rule = found
        if isinstance(value, dict) and pattern.endswith(".**"):
            continue  # its leaves are checked one by one
        if not pattern.endswith(".**"):
            done.append(path + ".")
        problem = rule.problem(select_value(cfg, path), cfg)
        if problem:
            refusals.setdefault(pattern, []).append(f"{path}={_show(value)}: {problem}")
        elif rule.kind == WARNED:
            warned.setdefault(pattern, []).append(path)
    if unknown:
        names = list(known) + [p for p in patterns if "*" not in p]
        described = []
        for path in unknown:
            match = suggest(path, names)
            described.append(f"{path} (did you mean {match}?)" if match else path)
        raise ValueError(f"unknown config key(s) {', '.join(described)}: nemo-dpo does not act on them "
                         f"(the known keys are those of {CONFIG_DIR.name}/{CONFIG_NAME}.yaml and "
                         f"nemo_dpo/training/nemo_keys.py)")
    if refusals:
        parts = [lines[0] + (f" (and {len(lines) - 1} more key(s) like it)" if len(lines) > 1 else "")
                 for lines in refusals.values()]
        raise ValueError(f"refused config key(s): {'; '.join(parts)}")
    return [ConfigWarning(tuple(keys), f"{', '.join(keys)}: no effect in nemo-dpo ({NEMO_KEYS[pattern].reason})")
            for pattern, keys in warned.items()]


def _check_values(cfg: DictConfig, ignored: frozenset[str] = frozenset()) -> None:
    """Refuse the ``model.dpo`` / ``model.optim`` values that cannot work (``ignored``: keys warned about)."""
    dpo = cfg.model.get("dpo") or {}
    DPOSettings.from_config({key: value for key, value in dpo.items() if f"model.dpo.{key}" not in ignored})
    params_dtype = precision_dtype(cfg.model.get("precision", cfg.get("trainer", {}).get("precision", 32)))
    optim = OptimizerSettings.from_config(cfg.model.optim, params_dtype)
    check_schedule_config(cfg.model.optim.get("sched"), optim.lr)
    if params_dtype is torch.bfloat16 and cfg.model.get("megatron_amp_O2", True) is False:
        # NeMo's O1 (fp32 weights, bf16 autocast) is not implemented; O2 is the closer and leaner one.
        log.warning("model.megatron_amp_O2=False: bf16 runs use O2 here (bf16 weights and compute, fp32 master "
                    "weights in the optimizer)")


def _log_warnings(warnings: list[ConfigWarning]) -> None:
    # Before torch.distributed starts, the launcher's RANK tells rank 0.
    if os.environ.get("RANK", "0") == "0":
        for warning in warnings:
            log.warning(warning.message)


def validate_config(cfg: DictConfig) -> list[ConfigWarning]:
    """Refuse, before any work, unknown and refused keys and the values that cannot work.

    Logs (rank 0) and returns one warning per group of keys that have no effect here.
    """
    warnings = check_config_keys(cfg)
    _log_warnings(warnings)
    _check_values(cfg, frozenset(key for warning in warnings for key in warning.keys))
    return warnings


def fill_defaults(cfg: DictConfig) -> None:
    """Add, in place, every key of ``conf/gpt_dpo.yaml`` that ``cfg`` lacks, with our YAML's value.

    A config written for NeMo Aligner lacks our own keys (``model.dpo.log_prob_chunk_size``,
    ``model.data.over_length_policy``, ...): they get their documented defaults. Present
    keys, null ones included, are left as they are.
    """
    def fill(node: DictConfig, ref: dict) -> None:
        for key, value in ref.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, dict) and isinstance(node._get_node(key), DictConfig):
                fill(node._get_node(key), value)

    with open_dict(cfg):
        fill(cfg, _reference())


def prepare_config(cfg: DictConfig) -> DictConfig:
    """What :func:`~nemo_dpo.training.train` runs ``cfg`` as: keys checked (warnings logged once, on
    rank 0), keys with no effect dropped, our defaults filled in, values checked. In place; returns ``cfg``."""
    warnings = check_config_keys(cfg)
    _log_warnings(warnings)
    with open_dict(cfg):
        for key in (key for warning in warnings for key in warning.keys):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]  # pop() would resolve the value first
    fill_defaults(cfg)
    _check_values(cfg)
    return cfg
