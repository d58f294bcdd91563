"""nemo_dpo.training's builders that need no process group: config, data, exp_manager decisions."""

import json

import pytest
import torch.distributed as dist
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from nemo_dpo.data import load_tokenizer
from nemo_dpo.training import (
    DEFAULT_DATA_DIR,
    build_dataset,
    check_data_impl,
    compose_config,
    log_dir_of,
    resume_checkpoint,
    train,
)
from nemo_dpo.training.config import CONFIG_DIR

PAIR = {"prompt": "2+2=", "chosen_response": "4", "rejected_response": "5"}


def test_compose_config_is_the_yaml_plus_overrides_and_leaves_hydra_clear():
    yaml = OmegaConf.load(CONFIG_DIR / "gpt_dpo.yaml")
    cfg = compose_config(["trainer.dpo.max_steps=3", "model.data.data_prefix.train=/data/train.jsonl"])
    assert not GlobalHydra.instance().is_initialized()
    assert "hydra" not in cfg and "defaults" not in cfg
    assert cfg.trainer.dpo.max_steps == 3 and cfg.trainer.max_steps == 3  # interpolation follows
    assert cfg.model.data.data_prefix.train == "/data/train.jsonl"
    assert cfg.model.optim == yaml.model.optim and cfg.exp_manager == yaml.exp_manager
    assert compose_config().trainer.dpo.max_steps == yaml.trainer.dpo.max_steps  # composable again


def test_compose_config_refuses_unknown_keys():
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.no_such_key=1"])


def test_data_impl_jsonl_is_accepted():
    check_data_impl(compose_config().model.data)


@pytest.mark.parametrize("impl,message", [
    ("mmap", r"model\.data\.data_impl='mmap' is not supported; valid values: \['jsonl', 'packed_jsonl'\]"),
])
def test_other_data_impls_are_refused_before_any_work(tmp_path, impl, message):
    cfg = compose_config([f"model.data.data_impl={impl}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):
        build_dataset(cfg.model, tokenizer=None, split="train")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_DATA_DIR.parent / "default_model" / "tokenizer")


def test_without_data_files_train_and_validation_are_the_embedded_data(tokenizer):
    model_cfg = compose_config(["model.encoder_seq_length=64"]).model
    validation = build_dataset(model_cfg, tokenizer, "validation")
    lines = (DEFAULT_DATA_DIR / "validation.jsonl").read_text().splitlines()
    assert len(validation) + validation.num_dropped == len(lines) == 400
    assert validation.seq_length == 64
    assert build_dataset(model_cfg, tokenizer, "test") is None


def test_given_files_are_used_and_missing_splits_stay_empty(tmp_path, tokenizer):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(PAIR) for _ in range(3)) + "\n")
    model_cfg = compose_config([f"model.data.data_prefix.train={tmp_path / 'train.jsonl'}",
                                "model.data.seq_length=32"]).model
    train_ds = build_dataset(model_cfg, tokenizer, "train")
    assert len(train_ds) == 3 and train_ds.seq_length == 32
    assert build_dataset(model_cfg, tokenizer, "validation") is None  # no fallback once a train file is given


def exp(**overrides):
    return OmegaConf.merge(compose_config().exp_manager, overrides)


def test_log_dir_is_explicit_or_exp_dir_slash_name(tmp_path):
    assert log_dir_of(exp(explicit_log_dir=str(tmp_path))) == tmp_path
    assert str(log_dir_of(exp(exp_dir="out", name="job"))) == "out/job"


def test_resume_decisions_without_checkpoints(tmp_path):
    empty = tmp_path / "checkpoints"
    assert resume_checkpoint(exp(resume_if_exists=False), empty) is None
    assert resume_checkpoint(exp(resume_if_exists=True, resume_ignore_no_checkpoint=True), empty) is None
    with pytest.raises(FileNotFoundError, match="resume_if_exists: no complete checkpoint in"):
        resume_checkpoint(exp(resume_if_exists=True, resume_ignore_no_checkpoint=False), empty)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=.*cannot be resumed from: its save did not finish"):
        resume_checkpoint(exp(resume_from_checkpoint=str(tmp_path / "nothing")), empty)
