"""Hugging Face import errors name what is wrong: architecture, weight files, tensor shapes."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from test_hf_checkpoint import make_hf_model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model(folder, "llama", num_hidden_layers=2)
    return folder


def edited_copy(folder, tmp_path, **config_changes):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(config_changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_unsupported_architecture_lists_the_supported_ones(llama_folder, tmp_path):
    from nemo_dpo.interop import open_pretrained

    folder = edited_copy(llama_folder, tmp_path, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(ValueError) as error:
        open_pretrained(folder)
    message = str(error.value)
    assert "GPTNeoXForCausalLM is not supported" in message
    assert all(name in message for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))


@pytest.mark.parametrize("changes,words", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), ["'llama3'", "RoPE scaling"]),
    # megatron-core hard-codes llama3's low/high frequency factors and original length.
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                           "high_freq_factor": 8.0, "original_max_position_embeddings": 8192}),
     ["'llama3'", "low_freq_factor=2.0", "high_freq_factor=8.0", "only with low_freq_factor=1.0, high_freq_factor=4.0"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["'yarn'", "'default', 'linear', 'llama3'"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (dict(attention_bias=True), ["attention_bias=True", "mlp_bias=False"]),
])
def test_unsupported_settings_are_named(llama_folder, tmp_path, changes, words):
    from nemo_dpo.interop import open_pretrained

    with pytest.raises(ValueError) as error:
        open_pretrained(edited_copy(llama_folder, tmp_path, **changes))
    assert all(word in str(error.value) for word in words), str(error.value)


def test_missing_weight_file_is_named(llama_folder, tmp_path):
    from nemo_dpo.interop import open_pretrained

    folder = edited_copy(llama_folder, tmp_path)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        open_pretrained(folder)
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weight files.*pytorch_model\.bin"):
        open_pretrained(folder)


def test_shape_mismatch_names_the_tensor(llama_folder, tmp_path):
    from nemo_dpo.interop import open_pretrained

    gate = r"model\.layers\.0\.mlp\.gate_proj\.weight .* has shape \[96, 64\].*implies \[80, 64\]"
    with pytest.raises(ValueError, match=gate):
        open_pretrained(edited_copy(llama_folder, tmp_path, intermediate_size=80))
    with pytest.raises(ValueError, match=r"lacks weights .* model\.layers\.2\.input_layernorm\.weight"):
        open_pretrained(edited_copy(llama_folder, tmp_path / "deeper", num_hidden_layers=3))


def load_into_other_architecture(path: str) -> str:
    """Build a model that disagrees with the checkpoint and try to load it; return the error."""
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    source = open_pretrained(path)
    cfg = OmegaConf.create({**source.architecture, "ffn_hidden_size": 80, "encoder_seq_length": 8})
    chunks = build_gpt_model(cfg, source.vocab_size)
    try:
        source.load_weights(chunks)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_model_of_another_architecture_is_refused(dist_pool, llama_folder):
    message = dist_pool.run(1, load_into_other_architecture, str(llama_folder))[0]
    assert "decoder.layers.mlp.linear_fc1.weight (layer 0)" in message and "160 rows" in message


def export_unexportable(out_dir: str) -> list[str]:
    """A GPT-2 style model (LayerNorm, GELU, learned positions) has no Llama/Qwen2 form; nor has an existing folder."""
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(2, 1))
    messages = []
    gpt2 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, encoder_seq_length=8)
    llama = dict(gpt2, normalization="rmsnorm", activation="swiglu", position_embedding_type="rope", bias=False)
    for architecture in (gpt2, llama):
        chunks = build_gpt_model(OmegaConf.create(architecture), 50)
        try:
            export_hf(chunks, architecture, 50, out_dir)
        except (ValueError, FileExistsError) as error:
            messages.append(str(error))
    return messages


def test_export_refusals_reach_every_rank(dist_pool, tmp_path):
    (tmp_path / "taken").mkdir()
    for messages in dist_pool.run(2, export_unexportable, str(tmp_path / "taken")):
        assert len(messages) == 2
        assert "normalization='layernorm'" in messages[0] and "activation='gelu'" in messages[0]
        assert "already exists" in messages[1]
