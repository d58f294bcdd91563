"""The default run config, ``gpt_dpo.yaml`` (the repository's ``conf/gpt_dpo.yaml`` is the same file)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "gpt_dpo"
