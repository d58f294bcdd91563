"""LoRA DPO: step-0 identities, only adapters train, the same losses at every parallel layout."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_workers import synthetic_pairs, train_dpo
from lora_workers import LORA, optimizer_footprint, step0_with_and_without_lora

LN2_FP32 = torch.tensor(math.log(2), dtype=torch.float32).item()


@pytest.mark.parametrize("tp,pp,world,precision", [(1, 1, 1, 32), (2, 1, 2, 32), (1, 1, 1, "bf16")], ids=str)
def test_step0_adapted_equals_base_and_reference_bitwise(dist_pool, tp, pp, world, precision):
    for r in dist_pool.run(world, step0_with_and_without_lora, tp, pp, synthetic_pairs(4), precision):
        assert torch.equal(r["policy"], r["base_policy"])  # B = 0: the adapted model is the base model
        assert torch.equal(r["policy"], r["reference"])  # adapters off gives the same bits
        assert r["loss"] == LN2_FP32
        assert r["metrics"]["acc"] == 0.0


def test_only_adapters_train_and_optimizer_state_scales_with_them(dist_pool):
    items = synthetic_pairs(4, seed=2)
    (lora,) = dist_pool.run(1, optimizer_footprint, items, LORA)
    (full,) = dist_pool.run(1, optimizer_footprint, items, None)
    (bf16,) = dist_pool.run(1, optimizer_footprint, items, LORA, "bf16")
    assert lora["optimized_ids"] == lora["adapter_ids"]
    assert lora["frozen_moved"] == []  # base weights bitwise unchanged
    assert lora["adapters_moved"] and all(lora["adapters_moved"])  # every adapter tensor was updated
    # DDP holds gradients of the adapters only; Adam keeps two fp32 moments per adapter value.
    assert lora["grad_buffer_numel"] == lora["adapter_numel"]
    assert lora["state_bytes"] == 2 * 4 * lora["adapter_numel"]
    assert full["state_bytes"] == 2 * 4 * full["model_numel"]
    assert lora["model_numel"] == full["model_numel"] + lora["adapter_numel"]
    # bf16: the optimizer steps fp32 master copies of the adapters (4 more bytes each); gradients stay fp32.
    assert bf16["optimized_numel"] == bf16["adapter_numel"]
    assert bf16["frozen_moved"] == [] and all(bf16["adapters_moved"])
    assert bf16["grad_buffer_numel"] == bf16["adapter_numel"] == lora["adapter_numel"]
    assert bf16["state_bytes"] == 3 * 4 * bf16["adapter_numel"]


# Adapters drawn non-zero (B normal) so that every adapter tensor has a gradient from step 0;
# layers 1 and 2 of 2 listed, dropout off: the runs must agree to rounding.
LAYOUT_LORA = {"peft_scheme": "lora", "lora_tuning": {
    "adapter_dim": 4, "alpha": 8, "target_modules": ["attention", "mlp"], "row_init_method": "normal",
    "layer_selection": [1, 2]}}
LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)]


@pytest.fixture(scope="module")
def layout_losses(dist_pool, tmp_path_factory):
    items = synthetic_pairs(20, seed=1)
    losses = {}
    for tp, pp, world in LAYOUTS:
        log_dir = str(tmp_path_factory.mktemp(f"lora_{tp}{pp}{world}"))
        records = dist_pool.run(world, train_dpo, tp, pp, 2, 4, 5, items, log_dir, None, 32, {"lr": 2e-2},
                                False, None, 0, None, LAYOUT_LORA)[0]["records"]
        losses[(tp, pp, world)] = [r["train/loss"] for r in records if "train/loss" in r]
    records = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path_factory.mktemp("lora_packed")), None, 32,
                            {"lr": 2e-2}, False, {"packing": True, "shared_prompt": True}, 0, None,
                            LAYOUT_LORA)[0]["records"]
    losses["packed, shared prompt"] = [r["train/loss"] for r in records if "train/loss" in r]
    return losses


@pytest.mark.parametrize("layout", LAYOUTS[1:] + ["packed, shared prompt"], ids=str)
def test_lora_losses_equal_at_every_layout(layout_losses, layout):
    reference = layout_losses[LAYOUTS[0]]
    assert len(reference) == 5 and reference[-1] < reference[0] - 0.01  # it learns
    assert layout_losses[layout] == pytest.approx(reference, abs=1e-5)
