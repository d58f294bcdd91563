"""The run configuration: ``conf/gpt_dpo.yaml`` plus Hydra-style overrides, without a Hydra app."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture, precision_dtype
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.optim.scheduler import check_schedule_config

log = logging.getLogger(__name__)

# The repository's conf/ folder (next to the package in a source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "gpt_dpo"


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR,
                   config_name: str = CONFIG_NAME) -> DictConfig:
    """The config ``python examples/train_gpt_dpo.py *overrides`` would run with.

    Uses Hydra's compose API, so the override grammar (``a.b=c``, ``+new=1``,
    quoting) is Hydra's own. Hydra's global state is cleared again on return, so
    this may be called any number of times in one process.
    """
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


# Keys the code reads that the reference YAML leaves out: the architecture (a
# checkpoint's own overrides them) and a few builder settings.
_EXTRA_KEYS = frozenset(
    {f"model.{name}" for name in GPTArchitecture.__dataclass_fields__}
    | {"model.init_method_std", "model.sequence_parallel", "model.transformer_engine", "model.optim.sched.max_steps"}
)


def _key_paths(node, prefix: str = "") -> dict[str, object]:
    """``dotted.key -> value`` for every key of a (nested) plain dict."""
    paths = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths[path] = value
        if isinstance(value, dict):
            paths.update(_key_paths(value, path + "."))
    return paths


def validate_config(cfg: DictConfig) -> None:
    """Refuse, before any work, unknown keys and the ``model.dpo`` / ``model.optim`` values that cannot work."""
    check_config_keys(cfg)
    DPOSettings.from_config(cfg.model.get("dpo"))
    params_dtype = precision_dtype(cfg.model.precision)
    optim = OptimizerSettings.from_config(cfg.model.optim, params_dtype)
    check_schedule_config(cfg.model.optim.get("sched"), optim.lr)
    if params_dtype is torch.bfloat16 and cfg.model.get("megatron_amp_O2", True) is False:
        # NeMo's O1 (fp32 weights, bf16 autocast) is not implemented; O2 is the closer and leaner one.
        log.warning("model.megatron_amp_O2=False: bf16 runs use O2 here (bf16 weights and compute, fp32 master "
                    "weights in the optimizer)")


def check_config_keys(cfg: DictConfig, reference: DictConfig | None = None) -> None:
    """Refuse keys that nothing reads, naming them (a YAML file's keys like command-line ones).

    ``reference`` is the config whose keys are known (default: ``conf/gpt_dpo.yaml``).
    Below a key whose reference value is a plain value or null, any content is
    the value's own business and is not checked.
    """
    if reference is None:
        reference = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml")
    # Unresolved: interpolations are values here, and a missing one must not fail this check.
    known = _key_paths(OmegaConf.to_container(reference, resolve=False))
    unknown = []
    for path in _key_paths(OmegaConf.to_container(cfg, resolve=False)):
        parent = path.rpartition(".")[0]
        opaque_parent = parent and (parent not in known or not isinstance(known[parent], dict))
        if path not in known and path not in _EXTRA_KEYS and not opaque_parent and path.split(".")[0] != "hydra":
            unknown.append(path)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}: nemo-dpo does not act on them "
            f"(the known keys are those of {CONFIG_DIR.name}/{CONFIG_NAME}.yaml)"
        )
