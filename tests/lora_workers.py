"""LoRA runs executed on every rank of a spawned gloo group by the LoRA tests."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from dpo_workers import EOS, VOCAB, model_config, step0_logprobs
from nemo_dpo.algorithms.dpo import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.lora import lora_of
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

LORA = {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 4, "alpha": 8, "target_modules": ["all"]}}


def step0_with_and_without_lora(tp: int, pp: int, items: list[dict], precision=32) -> dict:
    """Step-0 log-probs of the LoRA model (policy, reference, loss) and the policy of the same model without LoRA."""
    adapted = step0_logprobs(tp, pp, 2, items, precision=precision, peft=LORA)
    parallel_state.destroy_model_parallel()
    base = step0_logprobs(tp, pp, 2, items, precision=precision)
    return dict(adapted, base_policy=base["policy"])


def optimizer_footprint(items: list[dict], peft: dict | None, precision=32, steps: int = 2) -> dict:
    """What the optimizer and DDP hold, and whether frozen weights moved, after ``steps`` DPO steps."""
    from nemo_dpo.models.nlp.gpt.architecture import precision_dtype

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    cfg = model_config(2, len(items), precision, peft=peft)
    model = MegatronGPTDPOModel(cfg, VOCAB, model_chunks=build_gpt_model(cfg, VOCAB, seed=5))
    optimizer = build_optimizer(model.model, cfg.optim, precision_dtype(precision))
    chunk = model.model[0]
    lora = lora_of(chunk)
    adapter_ids = {id(p) for p in lora.parameters()} if lora is not None else set()
    frozen = {name: p.detach().clone() for name, p in chunk.module.named_parameters() if id(p) not in adapter_ids}
    initial_adapters = [p.detach().clone() for p in lora.parameters()] if lora is not None else []
    batch = dpo_custom_collate(items, eos_id=EOS)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = (
        model.get_ref_policy_logprobs(batch).chunk(2))
    for _ in range(steps):
        optimizer.zero_grad()
        model.prepare_for_training_step()
        model.get_loss_and_metrics(batch, forward_only=False)
        assert optimizer.step(clip_grad=0.0)[0]
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    moved = [name for name, p in chunk.module.named_parameters()
             if id(p) not in adapter_ids and not torch.equal(p.detach(), frozen[name])]
    return dict(
        optimized_ids=sorted(id(p) for p in optimized), adapter_ids=sorted(adapter_ids),
        optimized_numel=sum(p.numel() for p in optimized),
        adapter_numel=sum(p.numel() for p in lora.parameters()) if lora is not None else 0,
        model_numel=sum(p.numel() for p in chunk.module.parameters()),
        grad_buffer_numel=sum(b.grad_data.numel() for b in chunk.buffers),
        state_bytes=optimizer.state_bytes(), frozen_moved=moved,
        adapters_moved=[not torch.equal(p.detach(), q) for p, q in zip(lora.parameters(), initial_adapters)]
        if lora is not None else [],
    )


# Every target, two of four layers, B drawn non-zero: the adapted model differs from the base everywhere it can.
HF_LORA = {"peft_scheme": "lora", "lora_tuning": {
    "adapter_dim": 4, "alpha": 8, "target_modules": ["all"], "row_init_method": "normal", "layer_selection": [1, 3]}}


def lora_logits_and_exports(hf_path: str, layout: tuple, tokens: torch.Tensor, weights: torch.Tensor, out_dir: str,
                            sequence_parallel: bool = False) -> dict:
    """An HF model imported with LoRA at ``layout`` (TP, PP, VPP): logits (on the last
    stage, else None), and ``sum(logits * weights)``'s adapter gradients.

    The gradients come from the training path: megatron DDP and the pipeline
    schedule, whose ``finalize_model_grads`` sums sequence-parallel partial
    gradients over TP. Writes under ``out_dir``: ``adapter/`` (the adapters, PEFT
    format), ``grads/`` (the adapter gradients in the same format) and
    ``merged/`` (the merged HF model).
    """
    from omegaconf import OmegaConf
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.interop.hf.peft_adapter import export_peft_adapter
    from nemo_dpo.models.nlp.gpt.lora import merge_adapters
    from nemo_dpo.parallel.schedule import forward_backward, wrap_data_parallel

    initialize_parallel(ParallelLayout(*layout), seed=0)
    source = open_pretrained(hf_path)
    cfg = OmegaConf.create({**source.architecture, "encoder_seq_length": tokens.shape[1],
                            "make_vocab_size_divisible_by": 16, "sequence_parallel": sequence_parallel,
                            "peft": HF_LORA})
    chunks = build_gpt_model(cfg, source.vocab_size, seed=7)
    source.load_weights(chunks)
    logits_seen = []
    # One row per micro-batch: interleaved pipelines need at least PP micro-batches.
    micro_batches = list(zip(tokens.split(1), weights.split(1)))

    def forward_step(data_iterator, model):
        batch, batch_weights = next(data_iterator)
        output = model(batch, torch.arange(batch.shape[1]).expand_as(batch), None)

        def loss_func(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., :source.vocab_size]
            logits_seen.append(full.detach())
            # The schedule divides each micro-batch's loss by their number; the gradient wanted is the sum's.
            return (full * batch_weights).sum() * len(micro_batches), {}

        return output, loss_func

    wrapped = wrap_data_parallel(chunks)
    data = [iter(micro_batches) for _ in wrapped] if len(wrapped) > 1 else iter(micro_batches)
    forward_backward(wrapped, forward_step, data, len(micro_batches), seq_length=tokens.shape[1],
                     micro_batch_size=1, forward_only=False)
    export = dict(architecture=source.architecture, vocab_size=source.vocab_size)
    export_peft_adapter(chunks, **export, out_dir=f"{out_dir}/adapter", base_model=hf_path)
    adapters = [p for chunk in chunks for p in lora_of(chunk).parameters()]
    values = [p.detach().clone() for p in adapters]
    with torch.no_grad():
        for p in adapters:
            p.copy_(p.main_grad)
    export_peft_adapter(chunks, **export, out_dir=f"{out_dir}/grads")
    with torch.no_grad():
        for p, value in zip(adapters, values):
            p.copy_(value)
    merge_adapters(chunks)
    export_hf(chunks, **export, out_dir=f"{out_dir}/merged", tokenizer_dir=source.tokenizer_dir)
    return dict(logits=torch.cat(logits_seen) if logits_seen else None)


def restored_adapters_as_peft(overrides: list[str], out: str) -> None:
    """The run's model as ``train`` loads it (``restore_from_path`` included); its adapters written as PEFT."""
    from nemo_dpo.interop.hf.peft_adapter import export_peft_adapter
    from nemo_dpo.training.config import compose_config
    from nemo_dpo.training.model import load_pretrained_model
    from nemo_dpo.training.run import check_run_config, start_parallel

    cfg = compose_config(overrides)
    check_run_config(cfg)
    start_parallel(cfg.model)
    model, _, _ = load_pretrained_model(cfg)
    export_peft_adapter(model.model, cfg.model, model.vocab_size, out)
