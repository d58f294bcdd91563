"""``hydra_runner``, NeMo's decorator for script entry points (``nemo.core.config.hydra_runner``)."""

from __future__ import annotations

import functools

import hydra
from omegaconf import DictConfig


def hydra_runner(config_path: str | None = ".", config_name: str | None = None, schema=None):
    """Decorate ``main(cfg)``: called without arguments it parses the command line with Hydra
    (``config_path`` relative to the script); called with a config it runs on that config directly.

    ``schema`` (a structured-config class) is refused, as nemo-dpo validates configs itself.
    """
    if schema is not None:
        raise NotImplementedError("hydra_runner(schema=...) is not supported; configs are validated at start-up")

    def decorator(task_function):
        hydra_main = hydra.main(config_path=config_path, config_name=config_name, version_base=None)(task_function)

        @functools.wraps(task_function)
        def wrapper(cfg_passthrough: DictConfig | None = None):
            if cfg_passthrough is not None:
                return task_function(cfg_passthrough)
            return hydra_main()

        return wrapper

    return decorator
