"""DPO runs executed on every rank of a spawned gloo group by the DPO tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_dpo.algorithms import ref_logprob_cache
from nemo_dpo.algorithms.dpo import DPOTrainer, dpo_custom_collate
from nemo_dpo.data import MegatronPretrainingBatchSampler, MegatronPretrainingRandomBatchSampler, build_dataloader
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.optim.scheduler import CosineAnnealing
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel
from nemo_dpo.training.ref_cache import reference_weights_fingerprint
from nemo_dpo.utils.metrics_logger import MetricsLogger
from nemo_dpo.utils.run_timer import RunTimer

VOCAB = 60
EOS = 0
MODEL = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    encoder_seq_length=24, normalization="rmsnorm", activation="swiglu", position_embedding_type="rope",
    share_embeddings_and_output_weights=False, bias=False, make_vocab_size_divisible_by=16,
)


def synthetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """Dataset items of random prompts and responses of varied lengths (eos-terminated)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
        item = {}
        for side in ("chosen", "rejected"):
            response = torch.randint(1, VOCAB, (int(torch.randint(2, 10, (1,), generator=gen)),), generator=gen)
            tokens = torch.cat([prompt, response, torch.tensor([EOS])])
            labels = tokens.clone()
            labels[: len(prompt)] = -100
            item.update({side: tokens, f"{side}_labels": labels, f"{side}_length": len(tokens)})
        item.update(chosen_reward=1.0, rejected_reward=0.0)
        items.append(item)
    return items


def model_config(micro_batch_size: int, global_batch_size: int, precision=32, optim: dict | None = None,
                 data: dict | None = None, peft: dict | None = None, **dpo) -> OmegaConf:
    """``data``: ``model.data`` keys (e.g. ``packing``, ``pack_tokens``); ``peft``: ``model.peft`` (LoRA)."""
    return OmegaConf.create(dict(
        MODEL, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, precision=precision,
        **({"data": data} if data else {}), **({"peft": peft} if peft else {}),
        optim={"name": "adamw", "lr": 5e-3, "weight_decay": 0.01, **(optim or {})},
        dpo=dict(ref_policy_kl_penalty=0.5, log_prob_forward_micro_batch_size=micro_batch_size, **dpo),
    ))


class NeMoStyleBatchSampler:
    """The attributes NeMo's Megatron batch samplers have (no ``steps_per_epoch``), over one of ours."""

    def __init__(self, sampler):
        self._sampler = sampler
        for key in ("total_samples", "consumed_samples", "micro_batch_size", "global_batch_size",
                    "data_parallel_rank", "data_parallel_size", "drop_last"):
            setattr(self, key, getattr(sampler, key))
        self.pad_samples_to_global_batch_size = False

    def __len__(self):
        return len(self._sampler)

    def __iter__(self):
        return iter(self._sampler)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train_dpo(tp: int, pp: int, micro_batch_size: int, global_batch_size: int, steps: int,
              items: list[dict], log_dir: str, dpo_overrides: dict | None = None, precision=32,
              optim: dict | None = None, nemo_style: bool = False, data: dict | None = None, init_seed: int = 0,
              ref_cache: dict | None = None, peft: dict | None = None) -> dict:
    """Train ``steps`` DPO steps with validation at the end; rank 0 returns the logged metrics.

    Every rank also returns its optimizer-state bytes (``state_bytes``; None for a torch optimizer).
    ``nemo_style``: what NeMo Aligner code passes instead of ours: a plain
    ``torch.optim.AdamW`` over the model's parameters and a sampler without ``steps_per_epoch``.
    ``init_seed`` seeds the initial (and reference) weights. ``ref_cache``: precomputed reference
    log-probs in ``ref_cache["directory"]``, fingerprinted by the weights plus ``ref_cache["parts"]``;
    every rank also returns ``ref_forwards`` (calls of ``get_ref_policy_logprobs``) and
    ``cache_log`` (the cache's log messages). ``peft``: ``model.peft`` (LoRA).
    """
    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    cfg = model_config(micro_batch_size, global_batch_size, precision, optim, data, peft, **(dpo_overrides or {}))
    model = MegatronGPTDPOModel(cfg, VOCAB, model_chunks=build_gpt_model(cfg, VOCAB, seed=1234 + init_seed))
    ref_forwards = [0]
    reference_logprobs = model.get_ref_policy_logprobs

    def counted_reference_logprobs(batch):
        ref_forwards[0] += 1
        return reference_logprobs(batch)

    model.get_ref_policy_logprobs = counted_reference_logprobs
    cache_log = _Messages()
    logging.getLogger(ref_logprob_cache.__name__).addHandler(cache_log)
    logging.getLogger(ref_logprob_cache.__name__).setLevel(logging.INFO)
    if nemo_style:
        settings = OptimizerSettings.from_config(cfg.optim, precision_dtype(precision))
        params = [param for chunk in model.model for param in chunk.parameters()]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                      weight_decay=settings.weight_decay)
    else:
        optimizer = build_optimizer(model.model, cfg.optim, precision_dtype(precision))
    scheduler = CosineAnnealing(getattr(optimizer, "optimizer", optimizer), max_steps=steps, min_lr=5e-4,
                                warmup_steps=1)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    sampler_args = dict(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                        data_parallel_rank=dp_rank, data_parallel_size=dp_size)
    train_sampler = MegatronPretrainingRandomBatchSampler(len(items), 0, seed=3, **sampler_args)
    if nemo_style:
        train_sampler = NeMoStyleBatchSampler(train_sampler)
    val_sampler = MegatronPretrainingBatchSampler(len(items) - 4, 0, **sampler_args)
    trainer = DPOTrainer(
        cfg=OmegaConf.create(dict(max_epochs=100, max_steps=steps, val_check_interval=steps, save_interval=0,
                                  limit_train_batches=1.0, limit_val_batches=1.0, gradient_clip_val=1.0)),
        model=model, optimizer=optimizer, scheduler=scheduler,
        train_dataloader=build_dataloader(items, train_sampler),
        val_dataloader=build_dataloader(items[: len(items) - 4], val_sampler),
        test_dataloader=None,
        collate_fn=lambda batch: dpo_custom_collate(batch, eos_id=EOS),
        logger=MetricsLogger(log_dir, use_tensorboard=False), ckpt_callback=None, run_timer=RunTimer(None),
    )
    if ref_cache is not None:
        parts = {"weights": reference_weights_fingerprint(model), **ref_cache.get("parts", {})}
        trainer.use_ref_logprob_cache(ref_logprob_cache.RefLogprobCache(ref_cache["directory"], parts))
    try:
        trainer.fit()
    finally:
        logging.getLogger(ref_logprob_cache.__name__).removeHandler(cache_log)
    result = {"state_bytes": None if nemo_style else optimizer.state_bytes(), "ref_forwards": ref_forwards[0],
              "cache_log": cache_log.messages}
    if torch.distributed.get_rank() == 0:
        result["records"] = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return result


def step0_logprobs(tp: int, pp: int, micro_batch_size: int, items: list[dict], dpo: dict | None = None,
                   precision=32, data: dict | None = None, peft: dict | None = None) -> dict:
    """Policy and reference per-token log-probs and metrics of the first batch, before any update."""
    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    cfg = model_config(micro_batch_size, len(items), precision, data=data, peft=peft, **(dpo or {}))
    model = MegatronGPTDPOModel(cfg, VOCAB)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    local = items[dp_rank * len(items) // dp_size:(dp_rank + 1) * len(items) // dp_size]
    batch = dpo_custom_collate(local, eos_id=EOS)
    reference = model.get_ref_policy_logprobs(batch)
    policy = model.get_logprob_batch(batch)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = reference.chunk(2)
    model.prepare_for_training_step()
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    return dict(reference=reference, policy=policy, labels=labels, loss=loss, metrics=metrics)


def bf16_master_weights(steps: int, lr: float, items: list[dict]) -> dict:
    """Train bf16 with a constant ``lr``; per parameter: initial, after one step and final bf16 weights and fp32 masters."""
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    cfg = model_config(2, len(items), "bf16", optim=dict(lr=lr, weight_decay=0.0))
    model = MegatronGPTDPOModel(cfg, VOCAB)
    optimizer = build_optimizer(model.model, cfg.optim, torch.bfloat16)
    # megatron's mixed-precision optimizer pairs each bf16 parameter with its fp32 master, group by group.
    pairs = [(p, m) for group, masters in zip(optimizer._part.float16_groups, optimizer._part.fp32_from_float16_groups)
             for p, m in zip(group, masters)]
    batch = dpo_custom_collate(items, eos_id=EOS)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = (
        model.get_ref_policy_logprobs(batch).chunk(2))
    snapshots = {"initial": [p.detach().clone() for p, _ in pairs]}
    for step in range(steps):
        optimizer.zero_grad()
        model.prepare_for_training_step()
        model.get_loss_and_metrics(batch, forward_only=False)
        assert optimizer.step(clip_grad=0.0)[0]
        if step == 0:
            snapshots["first_model"] = [p.detach().clone() for p, _ in pairs]
            snapshots["first_master"] = [m.detach().clone() for _, m in pairs]
    snapshots["model"] = [p.detach().clone() for p, _ in pairs]
    snapshots["master"] = [m.detach().clone() for _, m in pairs]
    return snapshots


def padded_and_packed_logprobs(tp: int, pp: int, items: list[dict], pack_tokens: int) -> dict:
    """One model's per-token log-probs of ``items``, unpacked (one sequence per row) and packed."""
    from nemo_dpo.data.packing import pack_padded_batch
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import PackingSettings

    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    model = MegatronGPTDPOModel(model_config(1, len(items)), VOCAB)
    batch = dpo_custom_collate(items, eos_id=EOS)
    padded = model.get_logprob_batch(batch)
    model.packing = PackingSettings(enabled=True, pack_tokens=pack_tokens)
    packed = model.get_logprob_batch(batch)
    return dict(padded=padded, packed=packed, lengths=torch.cat([batch["chosen_length"], batch["rejected_length"]]),
                packs=[mb.num_pairs for mb in pack_padded_batch(batch, pack_tokens).micro_batches])


def weights_fingerprint(tp: int, pp: int, init_seed: int = 0) -> str:
    """The reference-weights fingerprint of the tiny model at layout ``(tp, pp)``, on every rank."""
    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    cfg = model_config(2, 4)
    return reference_weights_fingerprint(
        MegatronGPTDPOModel(cfg, VOCAB, model_chunks=build_gpt_model(cfg, VOCAB, seed=1234 + init_seed)))
