"""GPTArchitecture: defaults derived once, impossible shapes refused by name, config round trip."""

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture, precision_dtype

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4)


def test_derived_defaults():
    arch = GPTArchitecture(**BASE)
    assert (arch.ffn_hidden_size, arch.num_query_groups, arch.kv_channels) == (256, 4, 16)
    assert arch.bias and arch.qkv_bias and not arch.qk_layernorm
    assert arch.normalization == "layernorm" and arch.activation == "gelu"
    assert arch.position_embedding_type == "learned_absolute"
    assert GPTArchitecture(**BASE, bias=False).qkv_bias is False
    assert GPTArchitecture(**BASE, bias=False, qkv_bias=True).qkv_bias is True
    explicit = GPTArchitecture(**BASE, ffn_hidden_size=96, num_query_groups=2, kv_channels=24)
    assert (explicit.ffn_hidden_size, explicit.num_query_groups, explicit.kv_channels) == (96, 2, 24)


def test_kv_channels_need_not_divide_hidden_when_given():
    assert GPTArchitecture(num_layers=1, hidden_size=60, num_attention_heads=8, kv_channels=24).kv_channels == 24


def test_gated_activations():
    assert GPTArchitecture(**BASE, activation="swiglu").gated_linear_unit
    assert GPTArchitecture(**BASE, activation="fast-swiglu").gated_linear_unit
    assert not GPTArchitecture(**BASE, activation="squared-relu").gated_linear_unit
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(GPTArchitecture(**BASE, activation="squared-relu").activation_func(x), torch.tensor([0.0, 4.0]))


def test_from_config_ignores_other_keys_and_round_trips():
    cfg = OmegaConf.create(dict(BASE, micro_batch_size=4, precision="bf16", optim={"lr": 1.0}, num_query_groups=None,
                                encoder_seq_length=32, bias=0))
    arch = GPTArchitecture.from_config(cfg)
    assert arch.num_query_groups == 4 and arch.bias is False and arch.qkv_bias is False
    as_dict = arch.to_dict()
    assert "micro_batch_size" not in as_dict and "precision" not in as_dict
    # Unset optional keys stay out, so that merging into a run config keeps the run's values.
    assert "max_position_embeddings" not in as_dict and "make_vocab_size_divisible_by" not in as_dict
    assert as_dict["encoder_seq_length"] == 32 and as_dict["kv_channels"] == 16
    assert GPTArchitecture.from_config(as_dict) == arch
    assert arch.max_sequence_length == 32
    assert GPTArchitecture.from_config({**as_dict, "max_position_embeddings": 64}).max_sequence_length == 64


def test_rope_scaling_keys():
    rope = dict(BASE, position_embedding_type="rope")
    unscaled = GPTArchitecture(**rope).to_dict()
    assert not {"scale_positional_embedding", "rope_scaling_factor", "seq_len_interpolation_factor"} & set(unscaled)
    # NeMo's default factor when only the switch is given; the config round trip keeps both.
    llama3 = GPTArchitecture.from_config(OmegaConf.create(dict(rope, scale_positional_embedding=1)))
    assert llama3.scale_positional_embedding is True and llama3.rope_scaling_factor == 8.0
    assert GPTArchitecture.from_config(llama3.to_dict()) == llama3
    assert GPTArchitecture(**rope, scale_positional_embedding=True, rope_scaling_factor=32).rope_scaling_factor == 32
    linear = GPTArchitecture(**rope, seq_len_interpolation_factor=4)
    assert linear.to_dict()["seq_len_interpolation_factor"] == 4 and not linear.scale_positional_embedding


def test_embedded_default_model_config_loads():
    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR

    arch = GPTArchitecture.from_config(OmegaConf.load(DEFAULT_MODEL_DIR / "model_config.yaml"))
    assert (arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels) == (192, 6, 2, 32)
    assert arch.padded_vocab_size(2, 100) == 128  # divisible by 16 per TP shard


@pytest.mark.parametrize("changes,message", [
    (dict(num_query_groups=3), "model.num_attention_heads=4 is not a multiple of model.num_query_groups=3"),
    (dict(hidden_size=66), "model.hidden_size=66 is not divisible by model.num_attention_heads=4; "
                           "set model.kv_channels (the size of one head) explicitly"),
    (dict(normalization="batchnorm"),
     "model.normalization='batchnorm' is not supported; valid: ['layernorm', 'rmsnorm']"),
    (dict(activation="tanh"), "model.activation='tanh' is not supported; valid: ['fast-swiglu', 'geglu', 'gelu', "
                              "'squared-relu', 'swiglu']"),
    (dict(position_embedding_type="alibi"),
     "model.position_embedding_type='alibi' is not supported; valid: ['learned_absolute', 'rope']"),
    (dict(num_layers=0), "model.num_layers=0 must be a positive integer"),
    (dict(hidden_size=-64), "model.hidden_size=-64 must be a positive integer"),
    (dict(ffn_hidden_size=0), "model.ffn_hidden_size=0 must be a positive integer"),
    (dict(kv_channels=2.5), "model.kv_channels=2.5 must be a positive integer"),
    (dict(position_embedding_type="rope", scale_positional_embedding=True, rope_scaling_factor=0),
     "model.rope_scaling_factor=0 must be a positive finite number"),
    (dict(position_embedding_type="rope", seq_len_interpolation_factor=float("inf")),
     "model.seq_len_interpolation_factor=inf must be a positive finite number"),
    (dict(position_embedding_type="rope", rope_scaling_factor=8.0),
     "model.rope_scaling_factor=8.0 needs model.scale_positional_embedding=true"),
    (dict(scale_positional_embedding=True),
     "model.scale_positional_embedding needs model.position_embedding_type='rope', not 'learned_absolute'"),
    (dict(seq_len_interpolation_factor=2.0),
     "model.seq_len_interpolation_factor needs model.position_embedding_type='rope', not 'learned_absolute'"),
])
def test_impossible_architectures_are_named(changes, message):
    with pytest.raises(ValueError) as error:
        GPTArchitecture(**{**BASE, **changes})
    assert str(error.value) == message


def test_missing_required_keys_are_named():
    with pytest.raises(ValueError, match=r"lacks model\.hidden_size, model\.num_attention_heads"):
        GPTArchitecture.from_config({"num_layers": 2})


def test_precision_table():
    assert precision_dtype(32) is torch.float32 and precision_dtype("bf16-mixed") is torch.bfloat16
    assert precision_dtype("16") is torch.float16
    with pytest.raises(ValueError, match=r"model\.precision='fp8' is not supported; valid: "):
        precision_dtype("fp8")
