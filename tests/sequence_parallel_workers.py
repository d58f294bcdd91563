"""DPO steps with and without sequence parallelism, run on every rank of a spawned gloo group."""

from __future__ import annotations

import warnings

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from dpo_workers import EOS, VOCAB, model_config
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel
from nemo_dpo.training.trainer import sequence_length_multiple


def _dpo_step(sequence_parallel: bool, chunk_size: int | None, micro_batch_size: int, items: list[dict],
              model_overrides: dict) -> dict:
    """One backward of the DPO + SFT loss; the loss, per-token log-probs and every ``main_grad``."""
    cfg = model_config(micro_batch_size, len(items), log_prob_chunk_size=chunk_size, sft_loss_weight=0.5)
    cfg = OmegaConf.merge(cfg, model_overrides, {"sequence_parallel": sequence_parallel})
    model = MegatronGPTDPOModel(cfg, VOCAB)
    config = model.model[0].config
    # The collate the trainer builds: padded to a multiple of TP under sequence parallelism.
    batch = dpo_custom_collate(items, eos_id=EOS, pad_length_to_multiple_of=sequence_length_multiple(None, config))
    policy = model.get_logprob_batch(batch)
    # A reference away from the policy, so the loss is not ln 2 and the rewards are not 0.
    # The same offset at each (row, position), however far the batch is padded.
    rows, columns = policy.shape
    offset = 0.05 * torch.arange(rows).unsqueeze(1) - 0.02 * torch.arange(columns)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = (policy + offset).chunk(2)
    model.prepare_for_training_step()
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    named = [(f"{index}.{name}", param) for index, chunk in enumerate(model.model)
             for name, param in chunk.module.named_parameters()]
    grads = {name: param.main_grad.detach().clone() for name, param in named}
    norms_tagged = all(
        getattr(param, "sequence_parallel", False) == config.sequence_parallel for name, param in named if "norm" in name
    )
    return dict(sequence_parallel=config.sequence_parallel, length=batch["chosen"].shape[1], loss=loss,
                metrics=metrics, logprobs=policy, grads=grads, norms_tagged=norms_tagged)


def sequence_parallel_steps(tp: int, pp: int, micro_batch_size: int, items: list[dict], variants: list,
                            model_overrides: dict) -> dict:
    """``_dpo_step`` for each ``(sequence_parallel, chunk_size)`` variant, from the same initial weights."""
    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    steps = {variant: _dpo_step(*variant, micro_batch_size, items, model_overrides) for variant in variants}
    return dict(tp=parallel_state.get_tensor_model_parallel_rank(), pp=parallel_state.get_pipeline_model_parallel_rank(),
                steps=steps)


def unpadded_batch_is_refused(items: list[dict]) -> str:
    """The error a sequence-parallel model gives for a batch whose length is not a multiple of TP."""
    initialize_parallel(ParallelLayout(2, 1), seed=0)
    cfg = model_config(len(items), len(items))
    cfg.sequence_parallel = True
    model = MegatronGPTDPOModel(cfg, VOCAB)
    batch = dpo_custom_collate(items, eos_id=EOS)
    try:
        model.get_logprob_batch(batch)
    except ValueError as error:
        return str(error)
    return ""


def single_rank_turns_it_off() -> tuple[bool, list[str]]:
    """At TP=1, ``sequence_parallel=True``: the built model's setting and the warnings given."""
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    cfg = model_config(1, 1)
    cfg.sequence_parallel = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MegatronGPTDPOModel(cfg, VOCAB)
    return model.model[0].config.sequence_parallel, [str(w.message) for w in caught]
