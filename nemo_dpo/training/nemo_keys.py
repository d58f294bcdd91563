"""What nemo-dpo does with every config key NeMo Aligner's DPO runs use: one table.

Each key of NeMo Aligner's ``gpt_dpo.yaml``, of its user guide and functional
test commands, and of a NeMo GPT model config that a DPO run may override is
exactly one of:

- ``ACTED``: our code reads it (the reason says where);
- ``WARNED``: accepted, with a one-line warning at start-up saying it has no
  effect here and why; the key is then dropped from the run's config;
- ``REFUSED``: the run stops at start-up with the reason and what to do instead.

A rule may also accept only some values (``ok``): for an acted or warned key a
value outside them is refused with ``refusal``; for a refused key the values in
``ok`` are the "off" settings that mean what nemo-dpo does anyway (for example
``exp_manager.create_wandb_logger: False``), so they pass without a message.

Patterns are dotted keys; ``*`` stands for one key, a trailing ``**`` for
anything below. Keys of ``conf/gpt_dpo.yaml`` that are not in the table are our
own and acted on. The migration guide's key table is generated from
:data:`NEMO_KEYS` (:func:`key_table_rows`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture

ACTED, WARNED, REFUSED = "acted", "warned", "refused"


def _any(value, cfg) -> bool:
    return True


def _never(value, cfg) -> bool:
    return False


def _is(*allowed) -> Callable[[Any, Any], bool]:
    """Values equal to one of ``allowed`` (booleans and null by identity, so 1 is not True)."""
    def check(value, cfg) -> bool:
        for a in allowed:
            if a is None or isinstance(a, bool) or isinstance(value, bool):
                if value is a:
                    return True
            elif value == a:
                return True
        return False
    return check


def _equals_key(other: str) -> Callable[[Any, Any], bool]:
    """The value equals that of key ``other`` (a mirror such as ``trainer.max_steps``)."""
    def check(value, cfg) -> bool:
        return value == select_value(cfg, other)
    return check


def _wandb_off(value, cfg) -> bool:
    return select_value(cfg, "exp_manager.create_wandb_logger") in (None, False)


def _mlflow_off(value, cfg) -> bool:
    return select_value(cfg, "exp_manager.create_mlflow_logger") in (None, False)


def select_value(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


@dataclass(frozen=True)
class KeyRule:
    kind: str
    reason: str
    ok: Callable[[Any, Any], bool] = _any
    refusal: str = ""

    def problem(self, value, cfg) -> str | None:
        """Why ``value`` is refused, or None when it is accepted."""
        if self.kind == REFUSED:
            return None if self.ok(value, cfg) else self.reason
        return None if self.ok(value, cfg) else self.refusal


def acted(reason: str, ok=_any, refusal: str = "") -> KeyRule:
    return KeyRule(ACTED, reason, ok, refusal)


def warned(reason: str, ok=_any, refusal: str = "") -> KeyRule:
    return KeyRule(WARNED, reason, ok, refusal)


def refused(reason: str, ok=_never) -> KeyRule:
    return KeyRule(REFUSED, reason, ok)


_FUSION = "kernel fusions are chosen by nemo-dpo per device"
_FP16 = "fp16 loss scaling; fp16 is refused and bf16/fp32 need no loss scale"
_CKPT = "nemo-dpo writes and reads its own distributed checkpoints with fixed settings"
_TOKENIZER = "the tokenizer comes from the checkpoint; set model.tokenizer.path to use another"
_PRETRAIN_DATA = "a pretraining-data setting; DPO JSONL files are read whole, with no index or document shuffling"
_NO_LIGHTNING = "nemo-dpo has no PyTorch Lightning trainer"
_WANDB_INIT = "passed to wandb.init (utils/metrics_logger.py)"
_ALWAYS = "nemo-dpo implements only this value"

# key pattern -> rule. Order matters only for which refusal is reported first.
NEMO_KEYS: dict[str, KeyRule] = {
    # --- trainer -----------------------------------------------------------------------------
    "trainer.num_nodes": acted("launch size: checked against the world size by the launcher (torchrun/Slurm)"),
    "trainer.devices": acted("launch size: checked against the world size by the launcher (torchrun/Slurm)"),
    "trainer.accelerator": warned("the device is chosen automatically: CUDA when available, else CPU"),
    "trainer.precision": acted("model.precision (default ${trainer.precision}): the parameter dtype, "
                               "models/nlp/gpt/architecture.py:precision_dtype"),
    "trainer.dpo.max_epochs": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.max_steps": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.val_check_interval": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.save_interval": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.limit_train_batches": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.limit_val_batches": acted("DPOTrainer (algorithms/dpo.py)"),
    "trainer.dpo.gradient_clip_val": acted("DPOTrainer -> the optimizer's clipping"),
    "trainer.logger": warned(f"{_NO_LIGHTNING}; loggers come from exp_manager"),
    "trainer.enable_checkpointing": warned(f"{_NO_LIGHTNING}; checkpoints come from "
                                           "exp_manager.create_checkpoint_callback"),
    "trainer.use_distributed_sampler": warned(f"{_NO_LIGHTNING}; nemo-dpo always uses its Megatron batch samplers"),
    "trainer.max_time": acted("RunTimer: saves and stops when reached (training/trainer.py)"),
    "trainer.max_epochs": acted("mirror of trainer.dpo.max_epochs, which the trainer reads",
                                _equals_key("trainer.dpo.max_epochs"),
                                "differs from trainer.dpo.max_epochs, the value the trainer reads; set that one"),
    "trainer.max_steps": acted("mirror of trainer.dpo.max_steps, which the trainer reads",
                               _equals_key("trainer.dpo.max_steps"),
                               "differs from trainer.dpo.max_steps, the value the trainer reads; set that one"),
    # --- root ----------------------------------------------------------------------------------
    "precision": warned("the root-level precision is not read; trainer.precision sets the precision",
                        _equals_key("trainer.precision"),
                        "differs from trainer.precision, the value that sets the precision; set that one"),
    # --- exp_manager ---------------------------------------------------------------------------
    "exp_manager.explicit_log_dir": acted("the log folder (training/experiment.py:log_dir_of)"),
    "exp_manager.exp_dir": acted("the log folder <exp_dir>/<name> without explicit_log_dir (default results)"),
    "exp_manager.name": acted("the log folder <exp_dir>/<name> without explicit_log_dir"),
    "exp_manager.max_time_per_run": acted("mirror of trainer.max_time, which the run timer reads",
                                          _equals_key("trainer.max_time"),
                                          "differs from trainer.max_time, the value the run timer reads; "
                                          "set that one"),
    "exp_manager.create_wandb_logger": acted("a Weights & Biases run with metrics.jsonl's metric names "
                                             "(utils/metrics_logger.py; pip install nemo-dpo[wandb])"),
    "exp_manager.wandb_logger_kwargs.project": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.name": acted(_WANDB_INIT + " (null: exp_manager.name)"),
    "exp_manager.wandb_logger_kwargs.offline": acted("W&B's offline mode: the run is written under "
                                                     "<save_dir>/wandb only, for `wandb sync` later"),
    "exp_manager.wandb_logger_kwargs.save_dir": acted("the folder W&B writes its wandb/ folder in (null: the log "
                                                      "folder)"),
    "exp_manager.wandb_logger_kwargs.id": acted(_WANDB_INIT + "; a resumed run with the same id continues it"),
    "exp_manager.wandb_logger_kwargs.version": acted("alias of id, as in PyTorch Lightning's WandbLogger"),
    "exp_manager.wandb_logger_kwargs.entity": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.group": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.tags": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.notes": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.job_type": acted(_WANDB_INIT),
    "exp_manager.wandb_logger_kwargs.log_model": refused("checkpoints are not uploaded to W&B; they stay in "
                                                         "<log dir>/checkpoints", _is(False, None)),
    "exp_manager.wandb_logger_kwargs.**": refused("not a W&B setting nemo-dpo passes on (read only with "
                                                  "create_wandb_logger=True)", _wandb_off),
    "exp_manager.create_mlflow_logger": refused(
        "MLflow logging is not supported: mlflow's dependencies (a tracking server, SQL and data libraries) "
        "outweigh what it adds to metrics.jsonl, TensorBoard and W&B; use one of those", _is(False, None)),
    "exp_manager.mlflow_logger_kwargs.**": refused("MLflow logging is not supported (read only with "
                                                   "create_mlflow_logger=True)", _mlflow_off),
    "exp_manager.create_tensorboard_logger": acted("training/experiment.py:build_logger"),
    "exp_manager.resume_from_checkpoint": acted("training/experiment.py:resume_checkpoint"),
    "exp_manager.resume_if_exists": acted("training/experiment.py:resume_checkpoint"),
    "exp_manager.resume_ignore_no_checkpoint": acted("training/experiment.py:resume_checkpoint"),
    "exp_manager.create_checkpoint_callback": acted("training/experiment.py:build_checkpoint_callback"),
    "exp_manager.checkpoint_callback_params.monitor": acted("CheckpointCallback (top-k)"),
    "exp_manager.checkpoint_callback_params.save_top_k": acted("CheckpointCallback (top-k)"),
    "exp_manager.checkpoint_callback_params.mode": acted("CheckpointCallback (top-k)"),
    "exp_manager.checkpoint_callback_params.filename": acted("CheckpointCallback: checkpoint folder names"),
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": acted(
        "CheckpointCallback: writes checkpoints/final_model (a nemo-dpo model folder, not a .nemo file)"),
    "exp_manager.checkpoint_callback_params.always_save_nemo": refused(
        "nemo-dpo writes no .nemo files; the final weights go to checkpoints/final_model "
        "(save_nemo_on_train_end) and nemo-dpo-export-hf exports them", _is(False, None)),
    "exp_manager.checkpoint_callback_params.model_parallel_size": warned(
        "each checkpoint records its own parallel layout"),
    "exp_manager.checkpoint_callback_params.save_last": warned("the newest checkpoint is always kept"),
    "exp_manager.checkpoint_callback_params.every_n_train_steps": refused(
        "use trainer.dpo.save_interval", _is(None)),
    # --- pretrained_checkpoint -----------------------------------------------------------------
    "pretrained_checkpoint.restore_from_path": acted("training/model.py:load_pretrained_model (.nemo, Hugging "
                                                     "Face or nemo-dpo folder; null: the embedded default model)"),
    # --- model: parallelism, batches, precision ----------------------------------------------
    "model.mcore_gpt": warned("the model is always megatron-core's GPTModel", _is(True, None),
                              "the legacy (non-megatron-core) GPT model is not supported; use mcore_gpt=True"),
    "model.micro_batch_size": acted("batch samplers and the pipeline schedule"),
    "model.global_batch_size": acted("batch samplers and the pipeline schedule"),
    "model.rampup_batch_size": refused("batch-size ramp-up is not supported; train with a fixed "
                                       "global_batch_size", _is(None)),
    "model.megatron_amp_O2": acted("bf16 always runs O2 (bf16 weights, fp32 master weights); False warns "
                                   "(training/config.py:validate_config)"),
    "model.tensor_model_parallel_size": acted("parallel/initialize.py"),
    "model.pipeline_model_parallel_size": acted("parallel/initialize.py"),
    "model.virtual_pipeline_model_parallel_size": acted("parallel/initialize.py"),
    "model.expert_model_parallel_size": refused("mixture-of-experts models are not supported", _is(1, None)),
    "model.sequence_parallel": acted("models/nlp/gpt/builder.py and the collate's length padding"),
    "model.seed": acted("parallel/initialize.py (RNG) and the training sampler's shuffle"),
    "model.dpo.average_log_probs": warned("NeMo Aligner does not read it either; use "
                                          "model.dpo.preference_average_log_probs / sft_average_log_probs"),
    # --- model: PEFT ---------------------------------------------------------------------------
    "model.peft.peft_scheme": acted("none or lora: LoRA adapters on the parallel linear layers "
                                    "(models/nlp/gpt/lora.py)"),
    "model.peft.restore_from_path": acted("LoRA: start from the adapters of a LoRA checkpoint folder "
                                          "(training/model.py:restore_adapters)"),
    "model.peft.restore_from_ckpt.**": refused("resume a LoRA run with exp_manager.resume_from_checkpoint (its "
                                              "checkpoints hold the adapters and their optimizer state)", _is(None)),
    "model.peft.lora_tuning.weight_tying": refused("one adapter shared by every layer is not supported",
                                                   _is(False, None)),
    "model.peft.lora_tuning.position_embedding_strategy": refused("only used with weight_tying, which is not "
                                                                  "supported", _is(None)),
    "model.peft.lora_tuning.**": acted("LoRASettings (models/nlp/gpt/lora.py), read with peft_scheme=lora"),
    # --- model: places the run does not load from ----------------------------------------------
    "model.restore_from_path": refused("set pretrained_checkpoint.restore_from_path", _is(None)),
    "model.restore_from_ckpt": refused("set exp_manager.resume_from_checkpoint", _is(None)),
    "model.resume_from_checkpoint": refused("set exp_manager.resume_from_checkpoint", _is(None)),
    "model.skip_train": refused("nemo-dpo always trains", _is(False, None)),
    "model.reset_lr": refused("resetting the learning rate on resume is not supported", _is(False, None)),
    "model.reset_lr_steps": refused("resetting the learning rate on resume is not supported", _is(False, None)),
    "model.overwrite_base_config.**": warned("only architecture keys are taken from the checkpoint's config, "
                                             "so the run's data and other keys are never overwritten"),
    # --- model: the network (the checkpoint's own values are merged in) ------------------------
    "model.init_method_std": acted("models/nlp/gpt/builder.py (initialisation of new weights)"),
    "model.transformer_engine": acted("models/nlp/gpt/builder.py (layer spec)"),
    "model.hidden_dropout": acted("models/nlp/gpt/builder.py"),
    "model.attention_dropout": acted("models/nlp/gpt/builder.py"),
    "model.ffn_dropout": refused("dropout inside the MLP is not supported; use hidden_dropout", _is(0, 0.0, None)),
    "model.use_scaled_init_method": warned("DPO starts from a checkpoint's weights"),
    "model.apply_query_key_layer_scaling": refused(f"{_ALWAYS} (False)", _is(False, None)),
    "model.do_layer_norm_weight_decay": refused("norm and bias parameters get no weight decay "
                                                "(megatron-core's rule)", _is(False, None)),
    "model.pre_process": refused(f"{_ALWAYS} (True); pipeline stages set it themselves", _is(True, None)),
    "model.post_process": refused(f"{_ALWAYS} (True); pipeline stages set it themselves", _is(True, None)),
    "model.headscale": refused(f"{_ALWAYS} (False)", _is(False, None)),
    "model.transformer_block_type": refused(f"{_ALWAYS} (pre_ln)", _is("pre_ln", None)),
    "model.openai_gelu": refused(f"{_ALWAYS} (False)", _is(False, None)),
    "model.normalize_attention_scores": refused(f"{_ALWAYS} (True)", _is(True, None)),
    "model.attention_type": refused(f"{_ALWAYS} (multihead)", _is("multihead", None)),
    "model.drop_layers": refused("dropping layers is not supported", lambda v, cfg: not v),
    "model.fp32_residual_connection": refused(f"{_ALWAYS} (False)", _is(False, None)),
    "model.fp16_lm_cross_entropy": warned("log-probs are always computed in fp32"),
    "model.persist_layer_norm": warned(_FUSION),
    "model.bias_activation_fusion": warned(_FUSION),
    "model.bias_dropout_add_fusion": warned(_FUSION),
    "model.masked_softmax_fusion": warned(_FUSION),
    "model.get_attention_mask_from_fusion": warned(_FUSION),
    "model.apply_rope_fusion": warned(_FUSION),
    "model.gradient_accumulation_fusion": warned(_FUSION),
    "model.grad_div_ar_fusion": warned(_FUSION),
    "model.use_flash_attention": warned("attention is torch SDPA, which picks a flash kernel when it can"),
    "model.use_emha": refused(f"{_ALWAYS} (False)", _is(False, None)),
    "model.overlap_p2p_comm": warned("pipeline communication is megatron-core's schedule default"),
    "model.batch_p2p_comm": warned("pipeline communication is megatron-core's schedule default"),
    "model.sync_batch_comm": warned("pipeline communication is megatron-core's schedule default"),
    "model.tokenizer.library": warned(_TOKENIZER),
    "model.tokenizer.type": warned(_TOKENIZER),
    "model.tokenizer.model": warned(_TOKENIZER),
    "model.tokenizer.vocab_file": warned(_TOKENIZER),
    "model.tokenizer.merge_file": warned(_TOKENIZER),
    "model.tokenizer.delimiter": warned(_TOKENIZER),
    "model.tokenizer.sentencepiece_legacy": warned(_TOKENIZER),
    "model.native_amp_init_scale": warned(_FP16),
    "model.native_amp_growth_interval": warned(_FP16),
    "model.hysteresis": warned(_FP16),
    "model.grad_allreduce_chunk_size_mb": warned("use model.optim.bucket_cap_mb"),
    "model.gradient_as_bucket_view": warned("megatron DDP always keeps gradients in contiguous buckets"),
    "model.use_cpu_initialization": warned("chosen by nemo-dpo per device"),
    "model.onnx_safe": warned("nemo-dpo exports no ONNX"),
    "model.apex_transformer_log_level": warned("nemo-dpo does not use apex's transformer logging"),
    "model.nccl_communicator_config_path": warned("process groups use default NCCL options"),
    "model.validation_param_sync_overlap": warned("parameters are all-gathered after each step"),
    "model.sharp": warned("process groups use default NCCL options"),
    "model.enable_megatron_timers": warned("nemo-dpo logs step_time per step instead"),
    "model.megatron_timer_kwargs.**": warned("nemo-dpo logs step_time per step instead"),
    "model.gc_interval": warned("Python's garbage collector runs with its defaults"),
    "model.fsdp": refused("torch FSDP is not supported; use model.optim.name=distributed_fused_adam "
                          "(sharded optimizer state)", _is(False, None)),
    "model.fsdp_*": warned("read only with fsdp=True, which is refused"),
    "model.dist_ckpt_*": warned(_CKPT),
    "model.activations_checkpoint_granularity": acted("models/nlp/gpt/builder.py (recompute)"),
    "model.activations_checkpoint_method": acted("models/nlp/gpt/builder.py (recompute)"),
    "model.activations_checkpoint_num_layers": acted("models/nlp/gpt/builder.py (recompute)"),
    "model.num_micro_batches_with_partial_activation_checkpoints": refused(
        "partial recompute is not supported; use activations_checkpoint_*", _is(None)),
    "model.activations_checkpoint_layers_per_pipeline": refused(
        "partial recompute is not supported; use activations_checkpoint_*", _is(None)),
    "model.fp8": refused("fp8 is not supported yet; use trainer.precision=bf16", _is(False, None)),
    "model.fp8_*": warned("read only with fp8=True, which is refused"),
    "model.reduce_amax": warned("read only with fp8=True, which is refused"),
    "model.ub_tp_comm_overlap": refused("userbuffer TP overlap is not supported", _is(False, None)),
    "model.ub_tp_comm_overlap_cfg": refused("userbuffer TP overlap is not supported", _is(None)),
    "model.cpu_offloading": refused("activation/weight offloading is not supported", _is(False, None)),
    "model.cpu_offloading_*": warned("read only with cpu_offloading=True, which is refused"),
    "model.nsys_profile.enabled": refused("nsys profiling hooks are not supported; run nsys on the whole "
                                          "process", _is(False, None)),
    "model.nsys_profile.*": warned("read only with nsys_profile.enabled=True, which is refused"),
    # --- model.optim ---------------------------------------------------------------------------
    "model.optim.name": acted("optim/settings.py"),
    "model.optim.lr": acted("optim/settings.py"),
    "model.optim.weight_decay": acted("optim/settings.py"),
    "model.optim.betas": acted("optim/settings.py"),
    "model.optim.eps": acted("optim/settings.py"),
    "model.optim.bucket_cap_mb": acted("optim/settings.py (DDP bucket size)"),
    "model.optim.overlap_grad_sync": acted("optim/settings.py (DDP)"),
    "model.optim.overlap_param_sync": acted("optim/settings.py (True is refused there)"),
    "model.optim.contiguous_grad_buffer": acted("optim/settings.py (False is refused there)"),
    "model.optim.grad_sync_dtype": acted("optim/settings.py (DDP)"),
    "model.optim.use_distributed_optimizer": acted("optim/settings.py"),
    "model.optim.sched.name": acted("optim/scheduler.py"),
    "model.optim.sched.warmup_steps": acted("optim/scheduler.py"),
    "model.optim.sched.constant_steps": acted("optim/scheduler.py"),
    "model.optim.sched.min_lr": acted("optim/scheduler.py"),
    "model.optim.sched.max_steps": acted("optim/scheduler.py (default: the run's step count)"),
    # --- model.data ----------------------------------------------------------------------------
    "model.data.data_impl": acted("training/data.py:build_dataset (jsonl; packed_jsonl: data/packed_npy.py)"),
    "model.data.data_prefix": acted("training/data.py:build_dataset"),
    "model.data.seq_length": acted("training/data.py:build_dataset (null: model.encoder_seq_length)"),
    "model.data.pad_length_to_multiple_of": acted("the collate (training/trainer.py)"),
    "model.data.num_workers": acted("the data loaders"),
    "model.data.reset_position_ids": acted("the collate (training/trainer.py)"),
    "model.data.reset_attention_mask": acted("the collate (training/trainer.py)"),
    "model.data.eod_mask_loss": acted("the collate (training/trainer.py)"),
    "model.data.default_chosen_reward": acted("data/preference_dataset.py"),
    "model.data.default_rejected_reward": acted("data/preference_dataset.py"),
    "model.data.splits_string": refused("splitting one file into splits is not supported; give train, "
                                        "validation and test files in model.data.data_prefix", _is(None)),
    "model.data.skip_warmup": warned(_PRETRAIN_DATA),
    "model.data.index_mapping_dir": warned(_PRETRAIN_DATA),
    "model.data.mmap_bin_files": warned(_PRETRAIN_DATA),
    "model.data.num_dataset_builder_threads": warned(_PRETRAIN_DATA),
    "model.data.dataloader_type": warned(_PRETRAIN_DATA),
    "model.data.validation_drop_last": warned("validation uses every pair; the last global batch is padded"),
    "model.data.no_seqlen_plus_one_input_tokens": warned(_PRETRAIN_DATA),
    "model.data.pad_samples_to_global_batch_size": warned(_PRETRAIN_DATA),
    "model.data.shuffle_documents": warned(_PRETRAIN_DATA),
    "model.data.exchange_indices_distributed": warned(_PRETRAIN_DATA),
    "model.data.data_cache_generation_only": refused("there is no data cache to generate", _is(False, None)),
}

# The architecture fields (a checkpoint's own values are merged over them).
for _name in GPTArchitecture.__dataclass_fields__:
    NEMO_KEYS.setdefault(f"model.{_name}", acted("GPTArchitecture (models/nlp/gpt/architecture.py)"))

# Names users reach for, by leaf, -> the leaf nemo-dpo (and NeMo Aligner) uses.
ALIASES = {
    "beta": "ref_policy_kl_penalty",
    "kl_beta": "ref_policy_kl_penalty",
    "kl_penalty": "ref_policy_kl_penalty",
    "kl_coef": "ref_policy_kl_penalty",
    "loss_type": "preference_loss",
    "loss": "preference_loss",
    "learning_rate": "lr",
    "batch_size": "global_batch_size",
    "epochs": "max_epochs",
    "num_epochs": "max_epochs",
    "steps": "max_steps",
    "warmup": "warmup_steps",
    "dropout": "hidden_dropout",
    "max_seq_length": "seq_length",
    "max_length": "seq_length",
    "grad_clip": "gradient_clip_val",
    "max_grad_norm": "gradient_clip_val",
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
}


def rule_for(key: str) -> tuple[str, KeyRule] | None:
    """``(pattern, rule)`` of ``key`` (an exact entry first, then the first matching pattern)."""
    if key in NEMO_KEYS:
        return key, NEMO_KEYS[key]
    for pattern, rule in NEMO_KEYS.items():
        if pattern.endswith(".**"):
            if key.startswith(pattern[:-2]):
                return pattern, rule
        elif "*" in pattern and key.count(".") == pattern.count(".") and fnmatch.fnmatchcase(key, pattern):
            return pattern, rule
    return None


def covers_subtree(key: str) -> bool:
    """Whether a ``**`` pattern covers ``key`` and everything below it."""
    found = rule_for(key)
    return found is not None and found[0].endswith(".**")


def suggest(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to ``key`` (a sibling's name or an alias first, then the whole path)."""
    known = sorted(set(known))
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    names = siblings + [alias for alias, target in ALIASES.items() if target in siblings]
    match = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    if match:
        name = ALIASES.get(match[0], match[0]) if match[0] not in siblings else match[0]
        return f"{parent}.{name}" if parent else name
    # The right name under another parent (model.lr -> model.optim.lr).
    target = ALIASES.get(leaf, leaf)
    elsewhere = [k for k in known if k.rpartition(".")[2] == target]
    if len(elsewhere) == 1:
        return elsewhere[0]
    leaves = [k for k in known if not any(other.startswith(k + ".") for other in known)]
    match = difflib.get_close_matches(key, leaves, n=1, cutoff=0.75)
    return match[0] if match else None


def key_table_rows() -> list[tuple[str, str, str]]:
    """``(key pattern, kind, reason)`` for the migration guide, in table order."""
    rows = []
    for pattern, rule in NEMO_KEYS.items():
        reason = rule.reason if not rule.refusal else f"{rule.reason}; other values refused: {rule.refusal}"
        rows.append((pattern, rule.kind, reason))
    return rows
