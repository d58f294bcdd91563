"""``nemo-dpo-train``: the job of ``examples/train_gpt_dpo.py`` as an installed command.

It reads the packaged config (``nemo_dpo/conf/gpt_dpo.yaml``) and takes the same
arguments: Hydra overrides, ``--config-path``/``--config-name``, ``--help``.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from nemo_dpo.conf import CONFIG_DIR, CONFIG_NAME

_CONFIG_PATH_FLAGS = ("--config-path", "-cp")


def absolute_config_path(argv: list[str]) -> list[str]:
    """``argv`` with a relative ``--config-path``/``-cp`` made absolute against the working directory.

    Hydra takes it relative to the module declaring ``hydra.main``, which for an
    installed command is a folder inside site-packages.
    """
    def absolute(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)  # pkg://... names a Python package

    out = []
    pending_flag = False
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if pending_flag:
            arg = absolute(arg)
        elif flag in _CONFIG_PATH_FLAGS and equals:
            arg = f"{flag}={absolute(value)}"
        pending_flag = arg in _CONFIG_PATH_FLAGS
        out.append(arg)
    return out


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)
def _run(cfg: DictConfig) -> None:
    # Imported here so that --help and --cfg answer without loading torch and megatron-core.
    from nemo_dpo.training import train

    train(cfg)


def main() -> None:
    sys.argv[1:] = absolute_config_path(sys.argv[1:])
    _run()


if __name__ == "__main__":
    main()
