"""The run configuration: ``conf/gpt_dpo.yaml`` plus Hydra-style overrides, without a Hydra app."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

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
