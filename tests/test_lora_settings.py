"""model.peft: every key read, refused with its reason, or checked."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.lora import LoRASettings
from nemo_dpo.training.model import check_peft


def peft(**tuning):
    return OmegaConf.create({"peft": {"peft_scheme": "lora", "restore_from_path": None, "lora_tuning": tuning}})


def test_nemo_defaults_and_group_names():
    settings = LoRASettings.from_config(peft())
    assert (settings.adapter_dim, settings.alpha, settings.scaling) == (32, 32, 1.0)
    assert settings.module_paths == ("self_attention.linear_qkv",)
    assert (settings.column_init_method, settings.row_init_method) == ("xavier", "zero")
    assert LoRASettings.from_config(peft(target_modules=["mlp", "attention_qkv"])).module_paths == (
        "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
    assert len(LoRASettings.from_config(peft(target_modules="all", adapter_dim=8, alpha=2)).module_paths) == 4
    assert LoRASettings.from_config(peft(adapter_dim=8, alpha=2)).scaling == 0.25
    assert LoRASettings.from_config(peft(layer_selection=[3, 1, 3])).selected_layers(4) == (1, 3)
    assert LoRASettings.from_config(OmegaConf.create({"peft": {"peft_scheme": "none"}})) is None
    assert LoRASettings.from_config(OmegaConf.create({})) is None


@pytest.mark.parametrize("tuning,error,match", [
    (dict(target_modules=["attention_q"]), ValueError, r"target_modules=\['attention_q'\]: valid names are"),
    (dict(adapter_dim=0), ValueError, r"adapter_dim=0 must be a positive integer"),
    (dict(adapter_dropout=1.0), ValueError, r"adapter_dropout=1.0 must be in \[0, 1\)"),
    (dict(column_init_method="kaiming"), ValueError, r"column_init_method='kaiming'; valid: xavier, zero, normal"),
    (dict(layer_selection=[0, 2]), ValueError, r"layer_selection=\[0, 2\] must be null or a list of layer numbers"),
    (dict(weight_tying=True), NotImplementedError, r"weight_tying=true .* is not supported"),
    (dict(position_embedding_strategy="add"), ValueError, r"position_embedding_strategy='add' only applies with"),
    (dict(adapter_size=4), ValueError, r"lora_tuning: unknown key\(s\) adapter_size; valid: adapter_dim"),
])
def test_bad_lora_tuning_is_refused_naming_the_key(tuning, error, match):
    with pytest.raises(error, match=match):
        LoRASettings.from_config(peft(**tuning))


def test_layer_selection_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match=r"layer_selection: layers \[5\] do not exist \(the model has 4"):
        LoRASettings.from_config(peft(layer_selection=[1, 5])).selected_layers(4)


def test_restore_keys(tmp_path):
    cfg = OmegaConf.create({"peft": {"peft_scheme": "none", "restore_from_path": str(tmp_path)}})
    with pytest.raises(ValueError, match="restore_from_path starts from saved LoRA adapters; it needs"):
        check_peft(cfg)
    cfg = peft()
    cfg.peft.restore_from_path = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        check_peft(cfg)
    cfg = peft()
    cfg.peft.restore_from_ckpt = {"checkpoint_dir": str(tmp_path), "checkpoint_name": None}
    with pytest.raises(ValueError, match="restore_from_ckpt.checkpoint_dir: resume a LoRA run with exp_manager"):
        check_peft(cfg)
    assert check_peft(peft(adapter_dim=4)).adapter_dim == 4


def test_an_adapter_folder_is_not_a_pretrained_model(tmp_path):
    from nemo_dpo.training.model import open_checkpoint

    (tmp_path / "lora.json").write_text('{"base_checkpoint": "/models/base", "lora_tuning": {}}')
    with pytest.raises(ValueError, match=r"holds LoRA adapters, not a model: set it to their base \(/models/base\) "
                                         r"and model.peft.restore_from_path to"):
        open_checkpoint(str(tmp_path))


def test_transformer_engine_layers_are_refused_with_lora():
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model

    cfg = peft()
    cfg.merge_with({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "transformer_engine": True})
    with pytest.raises(ValueError, match="transformer_engine=true with model.peft.peft_scheme=lora: the adapters need"):
        build_gpt_model(cfg, 60)
