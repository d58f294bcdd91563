"""Packed runs executed on every rank of a spawned gloo group by the packing tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from dpo_workers import EOS, VOCAB, model_config, step0_logprobs, train_dpo
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.models.nlp.gpt import megatron_gpt_dpo_model
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel, PackingSettings
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel


def shared_prompt_logprobs(items: list[dict], pack_tokens: int) -> dict:
    """One model's per-token log-probs of ``items``: unpacked, shared-prompt packed, and with a leaky mask.

    ``leaky``: the shared-prompt packing with each rejected part attending to the
    whole chosen sequence (the blocks' ``shared`` widened over it), what the
    shared-prompt attention must never allow. ``saved``: shared-prompt tokens
    the packed pass did not compute.
    """
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    model = MegatronGPTDPOModel(model_config(1, len(items)), VOCAB)
    batch = dpo_custom_collate(items, eos_id=EOS)
    unpacked = model.get_logprob_batch(batch)
    model.packing = PackingSettings(enabled=True, pack_tokens=pack_tokens, shared_prompt=True)
    shared = model.get_logprob_batch(batch)
    saved = model.token_counts.shared_prompt_saved
    pack = megatron_gpt_dpo_model.pack_padded_batch

    def leaky_pack(*args, **kwargs):
        plan = pack(*args, **kwargs)
        leaky = []
        for mb in plan.micro_batches:
            blocks = mb.blocks.clone()
            blocks[:, 2] += blocks[:, 3]  # shared := the whole chosen
            blocks[:, 3] = 0
            leaky.append(replace(mb, blocks=blocks))
        return replace(plan, micro_batches=leaky)

    megatron_gpt_dpo_model.pack_padded_batch = leaky_pack
    try:
        leaky = model.get_logprob_batch(batch)
    finally:
        megatron_gpt_dpo_model.pack_padded_batch = pack
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    return dict(unpacked=unpacked, shared=shared, leaky=leaky, labels=labels, saved=saved,
                lengths=torch.cat([batch["chosen_length"], batch["rejected_length"]]))


def packing_modes(tp: int, pp: int, items: list[dict], log_dir: str, modes: dict[str, dict]) -> dict[str, dict]:
    """Per ``model.data`` setting in ``modes``: step 0 of ``items[:8]`` and 5 training steps with validation.

    Rank 0's entries hold the step-0 loss, accuracy and whether the policy and
    reference log-probs are bitwise equal, and the run's logged records.
    """
    out = {}
    for name, data in modes.items():
        step0 = step0_logprobs(tp, pp, 2, items[:8], None, 32, data)
        run = train_dpo(tp, pp, 2, 8, 5, items, f"{log_dir}/{name}", None, 32, None, False, data)
        out[name] = dict(loss0=step0["loss"], acc0=step0["metrics"]["acc"],
                         bitwise=torch.equal(step0["policy"], step0["reference"]), records=run.get("records"))
    return out


def shared_prompt_step_under_recompute(items: list[dict], recompute: dict[str, dict]) -> dict[str, dict]:
    """Loss and gradients of one shared-prompt packed step per activation-recompute setting in ``recompute``.

    Each entry also counts megatron's ``CheckpointFunction`` runs (0 without recompute).
    """
    from megatron.core.tensor_parallel import random as megatron_random

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    batch = dpo_custom_collate(items, eos_id=EOS)
    original = megatron_random.CheckpointFunction.forward
    out = {}
    for name, keys in recompute.items():
        cfg = model_config(2, len(items), data=dict(packing=True, shared_prompt=True, pack_tokens=40))
        cfg.update(keys)
        model = MegatronGPTDPOModel(cfg, VOCAB)
        calls = []

        def counting(ctx, *inputs):
            calls.append(1)
            return original(ctx, *inputs)

        step_batch = dict(batch)
        step_batch["ref_policy_log_probs_chosen"], step_batch["ref_policy_log_probs_rejected"] = (
            model.get_ref_policy_logprobs(batch).chunk(2))
        model.prepare_for_training_step()
        megatron_random.CheckpointFunction.forward = staticmethod(counting)
        try:
            loss, _ = model.get_loss_and_metrics(step_batch, forward_only=False)
        finally:
            megatron_random.CheckpointFunction.forward = staticmethod(original)
        grads = [param.main_grad.clone() for chunk in model.model for param in chunk.parameters()]
        out[name] = dict(loss=loss, grads=grads, checkpointed=len(calls))
    return out
