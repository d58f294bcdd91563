"""Where the frozen reference lives (model.dpo.ref_policy_placement): same log-probs, policy untouched, no hooks left."""

import pytest
import torch

from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.models.nlp.gpt.reference_policy import choose_placement

GiB = 2**30


def _hook_counts(chunks) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for chunk in chunks for m in chunk.modules()]


def _policy_state(model) -> dict:
    """Per parameter: a bitwise copy, its data pointer and its storage's pointer."""
    return {
        name: (param.detach().clone(), param.data_ptr(), param.untyped_storage().data_ptr())
        for chunk in model.model for name, param in chunk.module.named_parameters()
    }


def reference_after_training(placement: str, model_overrides: dict, dpo_overrides: dict, pp: int = 1) -> dict:
    """Train one step, then compare the reference pass with a fresh model holding the initial weights."""
    from omegaconf import OmegaConf

    from dpo_workers import EOS, VOCAB, model_config, synthetic_pairs
    from nemo_dpo.algorithms.dpo import dpo_custom_collate
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
    from nemo_dpo.optim.optimizer import build_optimizer
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, pp), seed=0)
    cfg = model_config(2, 4, ref_policy_placement=placement, **dpo_overrides)
    cfg = OmegaConf.merge(cfg, model_overrides)
    model = MegatronGPTDPOModel(cfg, VOCAB)
    initial = {name: p.detach().clone() for name, p in model.ref_policy_state_dict.items()}
    batch = dpo_custom_collate(synthetic_pairs(4, seed=1), eos_id=EOS)

    step0_reference = model.get_ref_policy_logprobs(batch)
    step0_policy = model.get_logprob_batch(batch)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = step0_reference.chunk(2)
    model.prepare_for_training_step()
    model.get_loss_and_metrics(batch, forward_only=False)
    optimizer = build_optimizer(model.model, OmegaConf.create({"lr": 5e-2, "weight_decay": 0.0}),
                                precision_dtype(cfg.get("precision", 32)))
    updated, _, _ = optimizer.step(clip_grad=1.0)

    before = _policy_state(model)
    hooks_before = _hook_counts(model.model)
    reference = model.get_ref_policy_logprobs(batch)
    after = _policy_state(model)
    policy = model.get_logprob_batch(batch)

    buffers_shared = []
    for chunk in model.model:
        for buffer in getattr(chunk, "buffers", []):
            if buffer.param_data is not None:
                storage = buffer.param_data.untyped_storage().data_ptr()
                buffers_shared += [p.untyped_storage().data_ptr() == storage for p in buffer.params]

    fresh = MegatronGPTDPOModel(cfg, VOCAB)
    with torch.no_grad():
        for chunk_index, chunk in enumerate(fresh.model):
            for name, param in chunk.module.named_parameters():
                param.copy_(initial[f"{chunk_index}.{name}"])
    expected = fresh.get_logprob_batch(batch)

    return dict(
        placement=model.reference_policy.placement,
        units=len(model.reference_policy._units),
        updated=updated,
        step0_equal=torch.equal(step0_reference, step0_policy),
        reference_equal_fresh=torch.equal(reference, expected),
        policy_differs=not torch.equal(policy, reference),
        params_unchanged=all(torch.equal(before[n][0], after[n][0]) for n in before),
        same_storage=all(before[n][1:] == after[n][1:] for n in before),
        buffers_shared=buffers_shared,
        hooks_restored=_hook_counts(model.model) == hooks_before,
        reference_dtypes={t.dtype for t in model.ref_policy_state_dict.values()},
        param_dtypes={p.dtype for chunk in model.model for p in chunk.parameters()},
    )


# placement, model overrides, model.dpo overrides, modules brought in one by one (per rank), PP
CASES = {
    "device": ("device", {}, {}, 0, 1),
    # embedding, 2 layers, final norm
    "cpu": ("cpu", {}, {}, 4, 1),
    # Chunked log-probs read the output layer's weight outside its forward; a tied
    # weight is used by the embedding and the output layer: both whole-pass, so
    # the embedding (its only parameter tied) is not a unit.
    "cpu-chunked-tied": ("cpu", {"share_embeddings_and_output_weights": True}, {"log_prob_chunk_size": 5}, 3, 1),
    "device-bf16": ("device", {"precision": "bf16"}, {}, 0, 1),
    # A stage holds the embedding and layer 0, the other layer 1 and the final norm.
    "cpu-pp2": ("cpu", {}, {}, 2, 2),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_initial_weights_and_leaves_the_policy_intact(dist_pool, case):
    placement, model_overrides, dpo_overrides, units, pp = CASES[case]
    for r in dist_pool.run(pp, reference_after_training, placement, model_overrides, dpo_overrides, pp):
        check_reference_run(r, placement, units)


def check_reference_run(r: dict, placement: str, units: int) -> None:
    assert r["placement"] == placement
    assert r["updated"]
    assert r["step0_equal"]
    assert r["reference_equal_fresh"]
    assert r["policy_differs"]
    assert r["params_unchanged"]
    assert r["same_storage"]
    assert all(r["buffers_shared"])
    assert r["hooks_restored"]
    assert r["reference_dtypes"] == r["param_dtypes"]
    assert r["units"] == units


def test_unknown_placement_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.dpo\.ref_policy_placement='gpu'.*valid: auto, device, cpu"):
        DPOSettings.from_config({"ref_policy_placement": "gpu"})


def test_auto_placement():
    assert choose_placement("auto", 10 * GiB, None)[0] == "device"
    assert choose_placement("auto", 10 * GiB, 18 * GiB)[0] == "device"
    placement, why = choose_placement("auto", 10 * GiB, 16 * GiB)
    assert placement == "cpu" and "16.00 GiB" in why
    assert choose_placement("cpu", 1, None)[0] == "cpu"
    assert choose_placement("device", 10 * GiB, 1)[0] == "device"


def reference_with_param_buffer(placement: str) -> dict:
    """Chunks whose parameters are views of a megatron DDP parameter buffer (distributed-optimizer layout)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from omegaconf import OmegaConf

    from dpo_workers import MODEL, VOCAB
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.models.nlp.gpt.reference_policy import ReferencePolicy
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    (gpt,) = build_gpt_model(OmegaConf.create(dict(MODEL, micro_batch_size=1, global_batch_size=1)), VOCAB)
    ddp = DistributedDataParallel(
        config=gpt.config, module=gpt, disable_bucketing=True,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
    )
    device = next(ddp.parameters()).device
    tokens = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(12, device=device).expand_as(tokens)
    with torch.no_grad():
        initial_logits = ddp(tokens, positions, None)
        reference = ReferencePolicy([ddp], placement)
        for param in ddp.parameters():
            param.add_(0.1)  # in place: into the buffer
        policy_logits = ddp(tokens, positions, None)
        with reference.active():
            reference_logits = ddp(tokens, positions, None)
        after_logits = ddp(tokens, positions, None)
    storage = [buffer.param_data.untyped_storage().data_ptr() for buffer in ddp.buffers]
    shared = [param.untyped_storage().data_ptr() in storage for param in ddp.parameters()]
    return dict(
        has_buffer=bool(storage) and all(s != 0 for s in storage),
        shared=shared,
        reference_equal=torch.equal(reference_logits, initial_logits),
        policy_restored=torch.equal(after_logits, policy_logits) and not torch.equal(policy_logits, initial_logits),
    )


@pytest.mark.parametrize("placement", ["device", "cpu"])
def test_parameters_stay_views_of_the_ddp_parameter_buffer(dist_pool, placement):
    (r,) = dist_pool.run(1, reference_with_param_buffer, placement)
    assert r["has_buffer"]
    assert r["shared"] and all(r["shared"])
    assert r["reference_equal"]
    assert r["policy_restored"]
