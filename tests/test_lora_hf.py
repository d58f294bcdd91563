"""LoRA against an independent reference: transformers + peft on the same tiny Llama with the same adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_workers import lora_logits_and_exports
from test_hf_checkpoint import SEQ, VOCAB, make_hf_model

peft = pytest.importorskip("peft")
# The projections one fused megatron adapter serves (they share its A).
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "fc1", "up_proj": "fc1"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model(folder, "llama")
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    # Scaled so that the adapter gradients are of order 1 (an absolute 1e-5 is then fp32-tight).
    weights = 0.01 * torch.randn(2, SEQ, VOCAB, generator=gen)
    return folder, tokens, weights


def reference_logits_and_grads(base_folder, adapter_folder, tokens, weights):
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)  # fp32
    model = peft.PeftModel.from_pretrained(base, adapter_folder, is_trainable=True)
    logits = model(tokens).logits
    (logits * weights).sum().backward()
    grads = {name.replace(".default", ""): p.grad for name, p in model.named_parameters() if "lora_" in name}
    return logits.detach(), grads


# TP=2: the adapters are split (fused QKV with GQA, gate/up); with sequence parallelism every
# adapter takes its sequence-parallel path. (TP=2 without it: tests/test_lora_training.py's layouts.)
# PP=2 with 2 virtual stages: one layer per chunk, adapters on stages and chunks 0 and 2 of 4 layers.
@pytest.mark.parametrize("layout,sequence_parallel", [((1, 1, None), False), ((2, 1, None), True),
                                                      ((1, 2, 2), False)], ids=["tp1", "tp2_sp", "pp2_vpp2"])
def test_lora_matches_peft_and_exports_load(dist_pool, llama, tmp_path, layout, sequence_parallel):
    import transformers

    folder, tokens, weights = llama
    world = layout[0] * layout[1]
    results = dist_pool.run(world, lora_logits_and_exports, str(folder), layout, tokens, weights, str(tmp_path),
                            sequence_parallel)
    ours = next(r for r in results if r["logits"] is not None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["layers_to_transform"] == [0, 2]
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    logits, grads = reference_logits_and_grads(folder, tmp_path / "adapter", tokens, weights)
    torch.testing.assert_close(ours["logits"], logits, rtol=0, atol=1e-5)
    base_logits = transformers.AutoModelForCausalLM.from_pretrained(folder)(tokens).logits.detach()
    assert (logits - base_logits).abs().max() > 1e-2  # the adapters change the model

    # B's gradient per projection; A's, shared by a fused adapter, is the sum over the projections it serves.
    our_grads = load_file(tmp_path / "grads" / "adapter_model.safetensors")
    assert set(our_grads) == set(grads) and len(grads) == 2 * 2 * 7
    assert 0.1 < max(g.abs().max().item() for g in grads.values()) < 10
    fused_a = {}
    for name, grad in grads.items():
        if ".lora_B." in name:
            torch.testing.assert_close(our_grads[name], grad, rtol=0, atol=1e-5, msg=name)
        else:
            layer, proj = name.split(".layers.")[1].split(".")[0], name.split(".")[-3]
            key = (layer, FUSED.get(proj, proj))
            fused_a[key] = (fused_a[key][0] + grad, name) if key in fused_a else (grad, name)
    for total, name in fused_a.values():
        torch.testing.assert_close(our_grads[name], total, rtol=0, atol=1e-5, msg=name)

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(tokens).logits.detach(), ours["logits"], rtol=0, atol=1e-5)
