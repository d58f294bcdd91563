"""NeMo 1.0 ``.nemo`` import: archives built here in NeMo's layout load with the right config and weights."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from layout_workers import weight_shards
from test_hf_checkpoint import write_tokenizer
from test_layouts import assemble_weights

VOCAB = 100
# A model_config.yaml as NeMo 1.0 writes it: NeMo spellings, training keys, interpolations.
NEMO_CONFIG = """
mcore_gpt: true
micro_batch_size: 1
global_batch_size: 8
tensor_model_parallel_size: 2
pipeline_model_parallel_size: 1
encoder_seq_length: 16
max_position_embeddings: ${.encoder_seq_length}
num_layers: 4
hidden_size: 64
ffn_hidden_size: 96
num_attention_heads: 4
num_query_groups: 2
kv_channels: null
init_method_std: 0.02
layernorm_epsilon: 1.0e-05
normalization: rmsnorm
activation: fast-swiglu
bias: false
position_embedding_type: rope
rotary_base: 500.0
rotary_percentage: 1.0
share_embeddings_and_output_weights: false
make_vocab_size_divisible_by: 16
transformer_engine: true
precision: ${trainer.precision}
seq_len_interpolation_factor: null
tokenizer:
  library: huggingface
  type: meta-llama/Llama-2-7b-hf
  model: null
  use_fast: true
optim:
  name: distributed_fused_adam
  lr: 1.0e-4
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
"""
ARCHITECTURE = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, normalization="rmsnorm", activation="swiglu", position_embedding_type="rope",
    rotary_base=500.0, rotary_percentage=1.0, share_embeddings_and_output_weights=False, bias=False,
    qkv_bias=False, qk_layernorm=False, layernorm_epsilon=1e-5, encoder_seq_length=16, max_position_embeddings=16,
    make_vocab_size_divisible_by=16,
)
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def write_nemo_weights(tp: int, precision, folder: str, dist_weights: bool, te_names: bool) -> dict:
    """Build the model at TP=tp and write it as NeMo does: dist checkpoint or per-rank torch files."""
    from nemo_dpo.checkpoint.dist_ckpt import save_model_weights
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(tp, 1))
    chunks = build_gpt_model(OmegaConf.create({**ARCHITECTURE, "precision": precision}), VOCAB, seed=7)
    folder = Path(folder)
    if dist_weights:
        if dist.get_rank() == 0:
            (folder / "model_weights").mkdir(parents=True)
        dist.barrier()
        save_model_weights(chunks, folder / "model_weights")
    else:
        state = {}
        for name, value in chunks[0].state_dict().items():
            if te_names:
                for local, te in TE_NAMES.items():
                    name = name.replace(local, te)
            state["model." + name] = value
            if te_names and name.endswith("linear_qkv.weight"):
                # transformer-engine FP8 metadata, which NeMo pickles as BytesIO beside the weights.
                state["model." + name.replace("weight", "_extra_state")] = io.BytesIO(b"fp8 metadata")
        rank_folder = folder if tp == 1 else folder / f"mp_rank_{dist.get_rank():02d}"
        path = rank_folder / "model_weights.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return dict(shards=weight_shards(chunks))


def pack(folder: Path, archive: Path, compress: bool = False) -> Path:
    with tarfile.open(archive, "w:gz" if compress else "w:") as tar:
        tar.add(folder, arcname=".")
    return archive


def nemo_folder(root: Path, name: str, config: str = NEMO_CONFIG) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "model_config.yaml").write_text(config)
    return folder


@pytest.fixture(scope="module")
def archives(dist_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo")
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    write_tokenizer(tokenizer, VOCAB)
    made = {}
    # Distributed checkpoint in bf16 (as NeMo saves), written at TP=2, packed as .nemo.
    folder = nemo_folder(root, "dist")
    dist_pool.run(2, write_nemo_weights, 2, "bf16", str(folder), True, False)
    made["dist"] = pack(folder, root / "dist.nemo")
    # Torch state dicts of 2 TP ranks with the local layer spec's names, gzip-compressed archive.
    folder = nemo_folder(root, "torch_tp2")
    reference = assemble_weights(dist_pool.run(2, write_nemo_weights, 2, 32, str(folder), False, False))
    made["torch_tp2"] = pack(folder, root / "torch_tp2.nemo", compress=True)
    # One torch state dict with transformer-engine names, as an unpacked folder.
    made["torch_te"] = nemo_folder(root, "torch_te")
    dist_pool.run(1, write_nemo_weights, 1, 32, str(made["torch_te"]), False, True)
    return root, tokenizer, made, reference


def import_nemo(path: str, tp: int, pp: int, tokenizer: str, extract_dir: str) -> dict:
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(tp, pp))
    source = open_pretrained(path, tokenizer_path=tokenizer, extract_dir=extract_dir)
    chunks = build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size, seed=999)
    source.load_weights(chunks)
    return dict(shards=weight_shards(chunks), architecture=source.architecture, vocab_size=source.vocab_size,
                format=source.format)


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, weight in want.items():
        actual = got[key]
        if key in VOCAB_KEYS:
            actual, weight = actual[:VOCAB], weight[:VOCAB]
        assert torch.equal(actual, weight), key


def test_config_maps_to_our_architecture(archives):
    from nemo_dpo.interop.nemo import architecture_from_nemo_config, read_nemo_config

    _, _, made, _ = archives
    assert architecture_from_nemo_config(read_nemo_config(made["torch_te"])) == ARCHITECTURE
    # RoPE scaling keys are NeMo's own names, passed through.
    for scaling in ("scale_positional_embedding: true\nrope_scaling_factor: 16.0", "seq_len_interpolation_factor: 4"):
        config = OmegaConf.create(NEMO_CONFIG.replace("seq_len_interpolation_factor: null", scaling))
        assert architecture_from_nemo_config(config) == {**ARCHITECTURE, **OmegaConf.create(scaling)}


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 2, 4)], ids=str)
def test_distributed_checkpoint_archive(dist_pool, archives, tmp_path, tp, pp, world):
    root, tokenizer, made, reference = archives
    results = dist_pool.run(world, import_nemo, str(made["dist"]), tp, pp, str(tokenizer), str(tmp_path))
    assert results[0]["format"] == "nemo" and results[0]["vocab_size"] == VOCAB
    assert results[0]["architecture"] == ARCHITECTURE
    # Same draw as the fp32 reference (weights do not depend on layout or dtype), rounded to bf16.
    expected = {k: v.to(torch.bfloat16).float() for k, v in reference.items()}
    assert_same_weights(assemble_weights(results), expected)
    assert len(list(tmp_path.iterdir())) == 1  # unpacked once, into one folder


@pytest.mark.parametrize("name,tp,pp,world", [("torch_tp2", 1, 2, 2), ("torch_te", 2, 1, 2)])
def test_torch_state_dict_checkpoints(dist_pool, archives, tmp_path, name, tp, pp, world):
    root, tokenizer, made, reference = archives
    results = dist_pool.run(world, import_nemo, str(made[name]), tp, pp, str(tokenizer), str(tmp_path))
    assert_same_weights(assemble_weights(results), reference)


def test_sentencepiece_tokenizer_inside_the_archive(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    from nemo_dpo.interop import open_pretrained

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, model_type="bpe",
        user_defined_symbols=["<extra_id_0>", "<extra_id_1>"], minloglevel=2,
    )
    folder = tmp_path / "sp"
    folder.mkdir()
    config = NEMO_CONFIG.replace(
        "library: huggingface\n  type: meta-llama/Llama-2-7b-hf\n  model: null",
        "library: sentencepiece\n  type: null\n  model: nemo:3f2a_tokenizer.model",
    )
    (folder / "model_config.yaml").write_text(config)
    (folder / "3f2a_tokenizer.model").write_bytes(model.getvalue())
    (folder / "model_weights.ckpt").write_bytes(b"")
    source = open_pretrained(pack(folder, tmp_path / "sp.nemo"), extract_dir=tmp_path / "cache")
    tokenizer = source.load_tokenizer()
    assert source.vocab_size == tokenizer.vocab_size == 60
    ids = tokenizer.text_to_ids("<extra_id_1>alpha beta")
    assert tokenizer.tokenizer.token_to_id("<extra_id_1>") in ids  # a single piece, as in NeMo
    assert tokenizer.tokenizer.token_to_id("<not_a_piece>") is None
    assert tokenizer.ids_to_text(ids) == "<extra_id_1>alpha beta"
    assert tokenizer.eos_id == 2 and tokenizer.bos_id == 1  # SentencePiece's own </s> and <s>
    assert sorted(p.name for p in source.tokenizer_dir.iterdir()) == ["tokenizer.model"]


def test_tokenizer_named_by_hub_id_needs_a_path(archives, tmp_path):
    from nemo_dpo.interop import open_pretrained

    _, _, made, _ = archives
    with pytest.raises(FileNotFoundError, match="meta-llama/Llama-2-7b-hf.*tokenizer"):
        open_pretrained(made["torch_te"])


@pytest.mark.parametrize("change,message", [
    (("mcore_gpt: true", "mcore_gpt: false"), "legacy"),
    (("position_embedding_type: rope", "position_embedding_type: alibi"), "position_embedding_type='alibi'"),
    (("activation: fast-swiglu", "activation: reglu"), "activation='reglu'"),
    (("seq_len_interpolation_factor: null", "seq_len_interpolation_factor: -4"),
     "seq_len_interpolation_factor=-4 must be a positive finite number"),
    (("seq_len_interpolation_factor: null", "rotary_interleaved: true"), "rotary_interleaved=True"),
])
def test_unsupported_config_is_named(tmp_path, change, message):
    from nemo_dpo.interop import open_pretrained

    folder = nemo_folder(tmp_path, "bad", NEMO_CONFIG.replace(*change))
    (folder / "model_weights.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=message):
        open_pretrained(folder)


def test_missing_weights_are_reported(tmp_path, archives):
    from nemo_dpo.interop import open_pretrained

    _, tokenizer, _, _ = archives
    folder = nemo_folder(tmp_path, "empty")
    with pytest.raises(ValueError, match="not a checkpoint nemo-dpo can read"):
        open_pretrained(folder, tokenizer_path=tokenizer)
    archive = pack(folder, tmp_path / "empty.nemo")
    source = open_pretrained(archive, tokenizer_path=tokenizer, extract_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no weights in .*model_weights/"):
        source.load_weights([])


def import_forward_export(path: str, tokenizer: str, tokens: torch.Tensor, out_dir: str) -> torch.Tensor:
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    source = open_pretrained(path, tokenizer_path=tokenizer)
    chunks = build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size)
    source.load_weights(chunks)
    with torch.no_grad():
        logits = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :source.vocab_size]
    export_hf(chunks, source.architecture, source.vocab_size, out_dir, tokenizer_dir=source.tokenizer_dir)
    return logits


def test_nemo_to_hugging_face(dist_pool, archives, tmp_path):
    """A .nemo exports to a Llama folder (config made from scratch) that transformers runs identically."""
    transformers = pytest.importorskip("transformers")
    import json

    _, tokenizer, made, _ = archives
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "hf"
    ours = dist_pool.run(1, import_forward_export, str(made["torch_te"]), str(tokenizer), tokens, str(out))[0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # from tokenizer_config.json
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, ours, atol=1e-5, rtol=0)


def load_misshapen(path: str, tokenizer: str) -> str:
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    source = open_pretrained(path, tokenizer_path=tokenizer)
    chunks = build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size)
    try:
        source.load_weights(chunks)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_shape_mismatch_names_the_tensor(dist_pool, archives, tmp_path):
    import shutil

    root, tokenizer, made, _ = archives
    for name in ("dist", "torch_te"):
        folder = tmp_path / name
        if made[name].is_file():
            folder.mkdir()
            with tarfile.open(made[name]) as tar:
                tar.extractall(folder, filter="data")
        else:
            shutil.copytree(made[name], folder)
        config = (folder / "model_config.yaml").read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 80")
        (folder / "model_config.yaml").write_text(config)
        message = dist_pool.run(1, load_misshapen, str(folder), str(tokenizer))[0]
        assert "decoder.layers.mlp.linear_fc1.weight" in message, message
        assert "(4, 192, 64)" in message or "(192, 64)" in message, message


def test_torch_files_are_never_unpickled_in_full(tmp_path):
    """Only tensors and transformer-engine's BytesIO extra state are read from torch files."""
    from fractions import Fraction

    from nemo_dpo.interop.nemo.weights import TorchStateDictWeights

    path = tmp_path / "model_weights.ckpt"
    torch.save({"model.output_layer.weight": torch.ones(2, 2), "hparams": Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="does not unpickle"):
        TorchStateDictWeights([(0, 0, path)], gated=False)
