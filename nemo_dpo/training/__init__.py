"""Builders shared by the example script, the installed commands (nemo_dpo/cli) and in-process tests.

``train(compose_config(overrides))`` runs a whole DPO job; the other functions
are its steps, usable one by one.
"""

from nemo_dpo.training.config import check_config_keys, compose_config, fill_defaults, prepare_config, validate_config
from nemo_dpo.training.data import (
    DATA_IMPLS,
    DEFAULT_DATA_DIR,
    build_dataset,
    build_train_dataloader,
    build_val_dataloader,
    check_data_impl,
)
from nemo_dpo.training.experiment import build_checkpoint_callback, build_logger, log_dir_of, resume_checkpoint
from nemo_dpo.training.model import load_pretrained_model
from nemo_dpo.training.run import train
from nemo_dpo.training.trainer import build_trainer

__all__ = [
    "DATA_IMPLS",
    "DEFAULT_DATA_DIR",
    "build_checkpoint_callback",
    "build_dataset",
    "build_logger",
    "build_train_dataloader",
    "build_trainer",
    "build_val_dataloader",
    "check_config_keys",
    "check_data_impl",
    "compose_config",
    "fill_defaults",
    "load_pretrained_model",
    "log_dir_of",
    "prepare_config",
    "resume_checkpoint",
    "train",
    "validate_config",
]
