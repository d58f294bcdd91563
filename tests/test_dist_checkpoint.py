"""Weights saved at TP=2 load at TP=1 and at PP=2 unchanged."""

import torch
from omegaconf import OmegaConf

from layout_workers import weight_shards
from test_layouts import MODELS, VOCAB, assemble_weights
from nemo_dpo.checkpoint.dist_ckpt import COMPLETE_MARKER, atomic_checkpoint_dir, load_model_weights, save_model_weights
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel


def save_then_report(tp, pp, model_cfg, seed, path):
    initialize_parallel(ParallelLayout(tp, pp))
    chunks = build_gpt_model(OmegaConf.create(model_cfg), VOCAB, seed=seed)
    with atomic_checkpoint_dir(path) as staging:
        save_model_weights(chunks, staging)
    return dict(shards=weight_shards(chunks))


def load_then_report(tp, pp, model_cfg, path):
    initialize_parallel(ParallelLayout(tp, pp))
    # A different seed: every weight must come from the checkpoint.
    chunks = build_gpt_model(OmegaConf.create(model_cfg), VOCAB, seed=999)
    load_model_weights(chunks, path)
    return dict(shards=weight_shards(chunks))


def test_tp2_checkpoint_loads_at_tp1_and_pp2(dist_pool, tmp_path):
    for name in ("gpt2_tied", "llama_gqa"):
        cfg = MODELS[name]
        path = tmp_path / name
        saved = assemble_weights(dist_pool.run(2, save_then_report, 2, 1, cfg, 7, str(path)))
        assert (path / COMPLETE_MARKER).exists() and not path.with_name(name + ".tmp").exists()
        for tp, pp, world in ((1, 1, 1), (1, 2, 2)):
            loaded = assemble_weights(dist_pool.run(world, load_then_report, tp, pp, cfg, str(path)))
            assert loaded.keys() == saved.keys()
            for key, weight in saved.items():
                rows = min(weight.shape[0], loaded[key].shape[0]) if key.endswith("word_embeddings.weight") or key.endswith("output_layer.weight") else None
                got, want = (loaded[key][:VOCAB], weight[:VOCAB]) if rows else (loaded[key], weight)
                assert torch.equal(got, want), f"{name} {key} differs after loading at TP={tp} PP={pp}"
