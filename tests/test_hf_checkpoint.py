"""Hugging Face import/export: our model gives transformers' logits at every layout, export round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from layout_workers import rank_coordinates, token_logprob_step

VOCAB = 120
SEQ = 12
HF_MODELS = {
    # GQA (4 heads, 2 groups), untied, small rope theta (large rotations), weights in 3 safetensors files.
    "llama": dict(cls="LlamaConfig", tokenizer_vocab=VOCAB, shard="20KB", config=dict(
        rope_theta=500.0, tie_word_embeddings=False)),
    # head_dim (24) != hidden / heads (16), 8 heads in 2 groups.
    "mistral": dict(cls="MistralConfig", tokenizer_vocab=VOCAB, shard=None, config=dict(
        num_attention_heads=8, head_dim=24, sliding_window=None, tie_word_embeddings=False)),
    # q/k/v biases only, tied embeddings, tokenizer smaller than the model's vocabulary (as Qwen2's).
    "qwen2": dict(cls="Qwen2Config", tokenizer_vocab=VOCAB - 10, shard=None, config=dict(
        tie_word_embeddings=True, rope_theta=1000.0)),
    # Per-head q/k RMSNorm before RoPE, head_dim (24) != hidden / heads (16), GQA, tied embeddings, no biases.
    "qwen3": dict(cls="Qwen3Config", tokenizer_vocab=VOCAB, shard=None, config=dict(
        head_dim=24, tie_word_embeddings=True, rope_theta=1000.0)),
    # Llama 3.1 RoPE scaling: with theta 5e5 and head_dim 16 the four lowest frequencies have wavelengths
    # beyond 8192 / 4, so scaling changes them (checked against an unscaled twin: "unscaled" below).
    "llama3_rope": dict(cls="LlamaConfig", tokenizer_vocab=VOCAB, shard=None, unscaled=True, config=dict(
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192))),
    # Linear RoPE scaling (positions halved).
    "linear_rope": dict(cls="LlamaConfig", tokenizer_vocab=VOCAB, shard=None, unscaled=True, config=dict(
        rope_theta=500.0, tie_word_embeddings=False, rope_scaling=dict(rope_type="linear", factor=2.0))),
}
LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2)]  # (tp, pp, world)


def write_tokenizer(folder: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


def make_hf_model(folder: Path, name: str, **overrides):
    """A tiny random transformers model saved with save_pretrained; returns it (fp32, eval)."""
    import transformers

    spec = HF_MODELS[name]
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)
    config.update(spec["config"])
    config.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, spec["cls"])(**config))
    with torch.no_grad():
        # Far from the default init so that every tensor (norms and biases included) matters.
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(folder, **kwargs)
    write_tokenizer(folder, spec["tokenizer_vocab"])
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tokens[0, :4] = VOCAB - 1  # the last real vocab row, next to the padding
    made = {}
    for name in HF_MODELS:
        folder = tmp_path_factory.mktemp(name)
        model = make_hf_model(folder, name)
        made[name] = dict(folder=folder, logits=hf_logits(model, tokens[:, :-1]))
        if HF_MODELS[name].get("unscaled"):
            # The same weights without RoPE scaling: an import that ignored the scaling would give these.
            twin = make_hf_model(tmp_path_factory.mktemp(f"{name}_unscaled"), name, rope_scaling=None)
            made[name]["unscaled_logits"] = hf_logits(twin, tokens[:, :-1])
    return tokens, made


def import_forward_export(path: str, tp: int, pp: int, tokens: torch.Tensor, out_dir: str,
                          vpp: int | None = None) -> dict:
    """Import an HF folder at (tp, pp[, vpp]), forward ``tokens``, export back to ``out_dir``."""
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel
    from nemo_dpo.parallel.schedule import forward_backward

    initialize_parallel(ParallelLayout(tp, pp, vpp), seed=0)
    source = open_pretrained(path)
    cfg = OmegaConf.create({**source.architecture, "encoder_seq_length": SEQ, "make_vocab_size_divisible_by": 16})
    chunks = build_gpt_model(cfg, source.vocab_size, seed=123)
    source.load_weights(chunks)
    micro_batches = list(tokens.split(2))
    data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    with torch.no_grad():
        outputs = forward_backward(chunks, token_logprob_step(source.vocab_size), data,
                                   len(micro_batches), seq_length=SEQ, micro_batch_size=2, forward_only=True)
    # Small files: the export writes several safetensors files and an index.
    export_hf(chunks, source.architecture, source.vocab_size, out_dir, tokenizer_dir=source.tokenizer_dir,
              max_shard_bytes=60_000)
    return dict(rank_coordinates(), outputs=outputs, architecture=source.architecture,
                vocab_size=source.vocab_size, tokenizer_vocab=source.load_tokenizer().vocab_size)


def original_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("tp,pp,world", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_import_matches_transformers_and_export_round_trips(dist_pool, hf_models, tmp_path, name, tp, pp, world):
    check_round_trip(dist_pool, hf_models, tmp_path, name, tp, pp, world)


def test_virtual_pipeline_stages(dist_pool, hf_models, tmp_path):
    """PP=2 with two model chunks per rank (one layer each)."""
    check_round_trip(dist_pool, hf_models, tmp_path, "llama", 1, 2, 2, vpp=2)


def check_round_trip(dist_pool, hf_models, tmp_path, name, tp, pp, world, vpp=None):
    import transformers

    tokens, made = hf_models
    folder, expected = made[name]["folder"], made[name]["logits"]
    out = tmp_path / "exported"
    results = dist_pool.run(world, import_forward_export, str(folder), tp, pp, tokens, str(out), vpp)
    last = next(r for r in results if r["last_stage"] and r["tp"] == 0)
    ours = torch.cat([o["logits"] for o in last["outputs"]])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1.0  # logits far from zero: the tolerance means something
    if "unscaled_logits" in made[name]:
        assert (expected - made[name]["unscaled_logits"]).abs().max() > 1e-3  # the scaling matters here

    # Export after import gives back every original tensor, bit for bit, and nothing else.
    original, exported = original_tensors(folder), original_tensors(out)
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == HF_MODELS[name]["cls"].replace("Config", "ForCausalLM")
    torch.testing.assert_close(hf_logits(reloaded, tokens[:, :-1]), ours, atol=1e-5, rtol=0)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "hf_config.json").exists()
    source_config, exported_config = (json.loads((f / "config.json").read_text()) for f in (folder, out))
    assert exported_config["rope_parameters"] == source_config["rope_parameters"]
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert last["vocab_size"] == VOCAB and last["tokenizer_vocab"] == HF_MODELS[name]["tokenizer_vocab"]


def test_architecture_from_config(hf_models):
    from nemo_dpo.interop.hf import architecture_from_hf_config, hf_config_from_architecture, read_hf_config

    _, made = hf_models
    llama = architecture_from_hf_config(read_hf_config(made["llama"]["folder"]))
    assert llama == dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, normalization="rmsnorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=500.0, rotary_percentage=1.0, share_embeddings_and_output_weights=False, bias=False,
        qkv_bias=False, qk_layernorm=False, layernorm_epsilon=1e-5, max_position_embeddings=64,
    )
    mistral = architecture_from_hf_config(read_hf_config(made["mistral"]["folder"]))
    assert (mistral["num_attention_heads"], mistral["num_query_groups"], mistral["kv_channels"]) == (8, 2, 24)
    qwen2 = architecture_from_hf_config(read_hf_config(made["qwen2"]["folder"]))
    assert qwen2["share_embeddings_and_output_weights"] and qwen2["qkv_bias"] and not qwen2["bias"]
    assert qwen2["rotary_base"] == 1000.0 and not qwen2["qk_layernorm"]
    qwen3 = architecture_from_hf_config(read_hf_config(made["qwen3"]["folder"]))
    assert qwen3["qk_layernorm"] and not qwen3["bias"] and not qwen3["qkv_bias"]
    assert (qwen3["num_attention_heads"], qwen3["num_query_groups"], qwen3["kv_channels"]) == (4, 2, 24)
    llama3 = architecture_from_hf_config(read_hf_config(made["llama3_rope"]["folder"]))
    assert llama3["scale_positional_embedding"] and llama3["rope_scaling_factor"] == 8.0
    assert "seq_len_interpolation_factor" not in llama3 and "scale_positional_embedding" not in llama
    linear = architecture_from_hf_config(read_hf_config(made["linear_rope"]["folder"]))
    assert linear["seq_len_interpolation_factor"] == 2.0 and "scale_positional_embedding" not in linear
    # Without a template the export writes transformers < 5 rope_scaling, which reads back the same.
    for arch, rope_type in ((llama3, "llama3"), (linear, "linear")):
        written = hf_config_from_architecture(arch, VOCAB, torch.float32)
        assert written["rope_scaling"]["rope_type"] == rope_type and "rope_parameters" not in written
        assert architecture_from_hf_config(written) == arch
    # transformers < 5 spelling of the rope settings.
    legacy = {k: v for k, v in read_hf_config(made["llama"]["folder"]).items() if k != "rope_parameters"}
    assert architecture_from_hf_config({**legacy, "rope_theta": 42.0, "rope_scaling": None})["rotary_base"] == 42.0


def save_model_folder(hf_path: str, folder: str) -> None:
    """Import an HF folder at TP=2 and save it as a nemo-dpo model folder."""
    from nemo_dpo.checkpoint.pretrained import save_pretrained
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(2, 1))
    source = open_pretrained(hf_path)
    cfg = OmegaConf.create({**source.architecture, "encoder_seq_length": SEQ})
    chunks = build_gpt_model(cfg, source.vocab_size)
    source.load_weights(chunks)
    save_pretrained(chunks, cfg, source.tokenizer_dir, folder)


def run_export_cli(argv: list[str]) -> None:
    from nemo_dpo.interop.export_cli import main

    main(argv)


def test_export_cli_from_model_folder(dist_pool, hf_models, tmp_path):
    """HF -> nemo-dpo model folder (TP=2) -> CLI export at PP=2 -> the original tensors and model type."""
    import transformers

    tokens, made = hf_models
    hf_folder = made["mistral"]["folder"]
    folder, out = tmp_path / "model", tmp_path / "hf"
    dist_pool.run(2, save_model_folder, str(hf_folder), str(folder))
    dist_pool.run(2, run_export_cli, ["--checkpoint", str(folder), "--out", str(out), "--pp", "2"])
    original, exported = original_tensors(hf_folder), original_tensors(out)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], t) for k, t in original.items())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["head_dim"] == 24
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(reloaded, tokens[:, :-1]), made["mistral"]["logits"], atol=1e-5, rtol=0)


def default_model_logits(tokens: torch.Tensor) -> torch.Tensor:
    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    source = open_pretrained(DEFAULT_MODEL_DIR)
    chunks = build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size)
    source.load_weights(chunks)
    with torch.no_grad():
        logits = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    return logits[..., :source.vocab_size]


def test_embedded_default_model_exports_to_transformers(dist_pool, tmp_path):
    """The trained default model (tied embeddings, no HF config to start from) runs the same in transformers."""
    import transformers

    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "23+45"}], add_generation_prompt=True)
    tokens = torch.tensor([tokenizer.text_to_ids(prompt + "68\n")])
    ours = dist_pool.run(1, default_model_logits, tokens)[0]
    out = tmp_path / "default_hf"
    dist_pool.run(2, run_export_cli, ["--checkpoint", str(DEFAULT_MODEL_DIR), "--out", str(out), "--tp", "2"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert config["eos_token_id"] == tokenizer.eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(model, tokens), ours, atol=1e-5, rtol=0)
    # It learned to add: the answer's tokens are its greedy choices in transformers too.
    answer = tokenizer.text_to_ids("68")
    start = len(tokenizer.text_to_ids(prompt))
    assert hf_logits(model, tokens)[0, start - 1:start - 1 + len(answer)].argmax(-1).tolist() == answer
