"""MegatronGPTDPOModel: preference batches -> megatron-core forward/backward -> loss and metrics.

Mirrors NeMo Aligner's class of the same name. A micro-batch of ``B`` pairs is
one forward of ``2B`` rows (all chosen, then all rejected). Per-token log-probs
come from the vocab-parallel, fp32, numerically stable log-softmax, once per
forward; the preference loss is a pure function of their masked per-sequence
sums (or means). The reference policy is a frozen copy of the initial weights
(``ReferencePolicy``: on the device or in CPU memory, ``model.dpo.ref_policy_placement``)
put into the same modules, so policy and reference log-probs share one code path
and are bitwise equal at step 0. With LoRA (``model.peft``) the reference is the
same modules with the adapters switched off (``AdaptersOffReference``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from nemo_dpo.data.packing import PackedMicroBatch, TokenCounts, pack_padded_batch, sequence_logprobs
from nemo_dpo.losses import (
    PreferenceLossInputs,
    PreferenceLossMixture,
    PreferenceLossSettings,
    build_preference_loss,
    logps_metrics,
    masked_sequence_logprobs,
    preference_accuracy,
    reward_metrics,
    split_chosen_rejected,
)
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.attention import SDPACoreAttention
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.losses.mixture import RPO_TERM
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.models.nlp.gpt.lora import has_lora
from nemo_dpo.models.nlp.gpt.reference_policy import AdaptersOffReference, ReferencePolicy, check_placement
from nemo_dpo.parallel.collectives import all_reduce, broadcast
from nemo_dpo.parallel.global_batch import reduce_global_batch
from nemo_dpo.models.nlp.gpt.optional_loss_inputs import (
    OPTIONAL_INPUT_FIELDS,
    optional_sequence_inputs,
    padded_segments,
)
from nemo_dpo.parallel.logprobs import (
    chunked_vocab_parallel_log_sum_squared_probs,
    chunked_vocab_parallel_logprobs,
    vocab_parallel_log_sum_squared_probs,
    vocab_parallel_logprobs,
)
from nemo_dpo.parallel.schedule import forward_backward, wrap_data_parallel

_REF_KEYS = ("ref_policy_log_probs_chosen", "ref_policy_log_probs_rejected")

# Zoo losses that divide by the response length themselves (and TRL's rpo_alpha term):
# they are given summed log-probs even with ``preference_average_log_probs``.
LENGTH_NORMALISED_LOSSES = frozenset({"sigmoid_norm", "simpo", "orpo", "sft"})


def _averages_preference_inputs(mixture: PreferenceLossMixture, average_log_probs: bool) -> bool:
    """Whether the loss is given per-token means (NeMo's ``preference_average_log_probs``) instead of sums.

    A selection mixing length-normalised losses with others under averaging is
    refused: one of the two would be given what it does not expect.
    """
    normalised = [name for name in mixture.names if name in LENGTH_NORMALISED_LOSSES]
    if mixture.settings.rpo_alpha is not None:
        normalised.append("rpo_alpha")
    if not average_log_probs or not normalised:
        return average_log_probs
    others = [name for name in mixture.names if name not in LENGTH_NORMALISED_LOSSES]
    if others:
        raise ValueError(
            f"model.dpo.preference_average_log_probs=true cannot mix the length-normalised {normalised} "
            f"with {others}: set it false (or select only one kind)")
    return False


def _split_rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items() if torch.is_tensor(value)}


def _trim_to_longest(batch: dict, multiple: int) -> dict:
    """A padded micro-batch cut to its longest sequence (rounded up to ``multiple``) instead of the batch's."""
    width = batch["chosen"].shape[1]
    longest = int(torch.cat([batch["chosen_length"], batch["rejected_length"]]).max())
    length = min(width, -(-longest // multiple) * multiple)
    if length == width:
        return batch
    # Per-token log-probs (reference) are one column shorter than the tokens.
    return {key: value[:, :length - (value.shape[1] < width)] if value.dim() == 2 else value
            for key, value in batch.items()}


def _pair_rows(batch: dict, chosen_key: str, rejected_key: str) -> torch.Tensor:
    return torch.cat((batch[chosen_key], batch[rejected_key]), dim=0)


@contextlib.contextmanager
def _output_layer_passes_hidden_states(gpt):
    """Within: ``gpt`` returns its output layer's input ``[batch, seq, hidden]`` instead of logits.

    Under sequence parallelism that input is this TP rank's slice of the
    sequence; it is gathered first, as the output layer itself would. The
    gather's backward keeps this rank's slice of the gradient, which the chunked
    log-prob function has already summed over TP.
    """
    layer = gpt.output_layer

    def hidden_states(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
        return input_, None

    layer.forward = hidden_states
    try:
        yield
    finally:
        del layer.forward  # the class's forward again


@contextlib.contextmanager
def _rotary_at_position_ids(gpt, position_ids: torch.Tensor):
    """Within: ``gpt``'s rotary embedding rotates each token by its ``position_ids`` ``[B, S]`` entry.

    megatron-core's RoPE rotates by the index in the row, whatever the position
    ids; packed rows restart positions per sequence. The table is megatron's own,
    indexed per token: ``[S, B, 1, dim]`` broadcasts over heads as ``[S, 1, 1, dim]`` does.
    """
    if gpt.position_embedding_type != "rope":
        yield
        return
    rope = gpt.rotary_pos_emb

    def per_token(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        table = type(rope).forward(rope, int(position_ids.max()) + 1, offset, packed_seq, cp_group)
        return table[:, 0][position_ids.t()]

    rope.forward = per_token
    try:
        yield
    finally:
        del rope.forward


def _check_packed_attention(model_chunks) -> None:
    """Refuse packing where a layer's core attention cannot take pair blocks (transformer-engine's)."""
    for chunk in model_chunks:
        for module in chunk.modules():
            core = getattr(module, "core_attention", None)
            if core is not None and not isinstance(core, SDPACoreAttention):
                raise ValueError(
                    f"model.data.packing=true needs the SDPA core attention, not {type(core).__name__}: set "
                    "model.transformer_engine=false (megatron-core's packed THD path with transformer-engine "
                    "is not wired in)")


@dataclass(frozen=True)
class PackingSettings:
    """``model.data.packing``, ``pack_tokens`` and ``shared_prompt`` (see ``_run_packed_schedule``).

    ``pack_tokens``: tokens per packed micro-batch (one row); None:
    ``micro_batch_size x 2 x seq_length``, what an unpacked micro-batch can hold.
    ``length_multiple``: ``model.data.pad_length_to_multiple_of`` for packed rows.
    ``shared_prompt``: each pair's prompt computed once, its rejected response
    attending to it but not to the chosen one (``data/packing.py``); it is a way
    of packing, so it needs ``packing: true`` (refused otherwise rather than
    turning packing on behind the user's back).
    """

    enabled: bool = False
    pack_tokens: int = 0
    length_multiple: int = 1
    shared_prompt: bool = False

    @classmethod
    def from_config(cls, cfg) -> "PackingSettings":
        data = cfg.get("data") or {}
        enabled = data.get("packing", False)
        shared_prompt = data.get("shared_prompt", False)
        for key, value in (("packing", enabled), ("shared_prompt", shared_prompt)):
            if not isinstance(value, bool):
                raise ValueError(f"model.data.{key}={value!r} must be true or false")
        if shared_prompt and not enabled:
            raise ValueError("model.data.shared_prompt=true needs model.data.packing=true "
                             "(a shared prompt is a packed block: set both)")
        seq_length = data.get("seq_length") or cfg.get("encoder_seq_length") or 0
        pack_tokens = data.get("pack_tokens")
        if pack_tokens is None:
            pack_tokens = cfg.micro_batch_size * 2 * seq_length
        elif isinstance(pack_tokens, bool) or not isinstance(pack_tokens, int) or pack_tokens <= 0:
            raise ValueError(f"model.data.pack_tokens={pack_tokens!r} must be a positive integer")
        if enabled and cfg.get("position_embedding_type", "learned_absolute") not in ("rope", "learned_absolute"):
            raise ValueError("model.data.packing=true needs position_embedding_type rope or learned_absolute, got "
                             f"{cfg.get('position_embedding_type')}")
        return cls(enabled, pack_tokens, data.get("pad_length_to_multiple_of") or 1, shared_prompt)


@dataclass(frozen=True)
class DPOSettings(PreferenceLossSettings):
    """``model.dpo``: every key with its one default (``conf/gpt_dpo.yaml`` states the same values).

    ``ref_policy_kl_penalty`` is the loss's beta. ``None`` for
    ``sft_average_log_probs`` follows ``preference_average_log_probs``, and for
    ``log_prob_forward_micro_batch_size`` the training micro-batch size.
    ``log_prob_chunk_size``: tokens whose logits exist at once (log-probs come
    from the output layer's input, chunk by chunk); ``None`` keeps whole logits.
    ``ref_policy_placement``: where the frozen reference weights live (``auto``,
    ``device``, ``cpu``; see ``reference_policy.py``).
    ``precompute_ref_log_probs``: reference log-probs of the training and
    validation sets computed once before training and kept on disk
    (``algorithms/ref_logprob_cache.py``) in ``ref_log_probs_cache_dir``
    (``None``: ``<log dir>/ref_log_probs``).
    ``preference_loss``: a loss name or alias, ``package.module:function``, or a
    list of them weighted by ``preference_loss_weights`` (docs/losses.md); TRL's
    hyperparameters of those losses (``label_smoothing``...) and their defaults
    are those of the base class ``PreferenceLossSettings``.
    """

    ref_policy_kl_penalty: float = 0.3
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool | None = None
    gt_reward_scale: float = 1.0
    preference_loss: str | tuple[str, ...] = "dpo"
    preference_loss_weights: tuple[float, ...] | None = None
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    log_prob_forward_micro_batch_size: int | None = None
    log_prob_chunk_size: int | None = None
    ref_policy_placement: str = "auto"
    precompute_ref_log_probs: bool = False
    ref_log_probs_cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        for key in ("preference_loss", "preference_loss_weights"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, key, tuple(value))  # a YAML list
        # Fails at start-up for an unknown loss (listing the valid names) or unused settings.
        _averages_preference_inputs(self.build_preference_loss(), self.preference_average_log_probs)
        if self.ld_alpha is not None and self.preference_average_log_probs:
            raise ValueError("model.dpo.ld_alpha re-weights summed log-probs: set preference_average_log_probs false")
        # A negative beta inverts the objective; NaN or inf poisons every step.
        if not (math.isfinite(self.ref_policy_kl_penalty) and self.ref_policy_kl_penalty > 0):
            raise ValueError(f"model.dpo.ref_policy_kl_penalty={self.ref_policy_kl_penalty} must be a finite number > 0")
        for key in ("gt_reward_scale", "preference_loss_weight", "sft_loss_weight"):
            value = getattr(self, key)
            if not math.isfinite(value) or (key != "gt_reward_scale" and value < 0):
                raise ValueError(f"model.dpo.{key}={value} must be a finite number" + (
                    "" if key == "gt_reward_scale" else " >= 0"))
        for key in ("log_prob_forward_micro_batch_size", "log_prob_chunk_size"):
            size = getattr(self, key)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
                raise ValueError(f"model.dpo.{key}={size!r} must be a positive integer")
        check_placement(self.ref_policy_placement)
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo: preference_loss_weight and sft_loss_weight cannot both be 0")
        if self.sft_average_log_probs is None:
            object.__setattr__(self, "sft_average_log_probs", self.preference_average_log_probs)

    def loss_settings(self) -> PreferenceLossSettings:
        """The hyperparameters every term of the selected losses reads."""
        return PreferenceLossSettings(**{f.name: getattr(self, f.name) for f in fields(PreferenceLossSettings)})

    def build_preference_loss(self) -> PreferenceLossMixture:
        """A fresh mixture of the selected losses (stateful terms start from scratch)."""
        return build_preference_loss(self.preference_loss, self.preference_loss_weights, self.loss_settings())

    @classmethod
    def from_config(cls, dpo_cfg) -> "DPOSettings":
        """Settings from a ``model.dpo`` mapping; an unknown key is refused, naming the valid ones."""
        loss_keys = [f.name for f in fields(PreferenceLossSettings)]
        valid = [f.name for f in fields(cls) if f.name not in loss_keys] + loss_keys
        given = dict(dpo_cfg or {})
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"model.dpo: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return cls(**given)


class MegatronGPTDPOModel:
    """A megatron-core GPT policy trained with a DPO-family loss.

    Args:
        cfg: the ``model`` config (NeMo Aligner layout): architecture keys,
            ``micro_batch_size``, ``global_batch_size``, ``dpo.*``.
        vocab_size: the tokenizer's vocabulary size.
        model_chunks: already built (e.g. imported) chunks; built from ``cfg`` if None.
    """

    # The tokenizer (``eos_id``, ``text_to_ids``...), set where a checkpoint is loaded; None when built bare.
    tokenizer = None
    # The checkpoint the weights were loaded from, recorded by LoRA checkpoints (None: built bare or the
    # embedded default model).
    base_checkpoint = None

    def __init__(self, cfg, vocab_size: int, model_chunks=None):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.dpo = DPOSettings.from_config(cfg.get("dpo"))
        # The selected losses (one instance per model: bco_pair's running mean lives here).
        self.preference_loss = self.dpo.build_preference_loss()
        self.average_preference_inputs = _averages_preference_inputs(
            self.preference_loss, self.dpo.preference_average_log_probs)
        self._update_loss_state = True
        self.packing = PackingSettings.from_config(cfg)
        # This rank's token positions computed so far, their padding, and shared-prompt tokens not computed.
        self.token_counts = TokenCounts()
        if model_chunks is None:
            model_chunks = build_gpt_model(cfg, vocab_size)
        # DDP's gradient buffers and reduction must match what the optimizer expects.
        optim_cfg = cfg.get("optim")
        params_dtype = precision_dtype(cfg.get("precision", 32))
        ddp_config = OptimizerSettings.from_config(optim_cfg, params_dtype).ddp_config() if optim_cfg else None
        self.model = wrap_data_parallel(model_chunks, ddp_config)
        if self.packing.enabled:
            _check_packed_attention(self.model)
        # A reference-free loss never reads the reference: none is kept. With LoRA the
        # reference is the base model with adapters off: no copy, no placement to choose.
        if self.preference_loss.reference_free:
            self.reference_policy = None
        else:
            reference = AdaptersOffReference if has_lora(self.model) else ReferencePolicy
            self.reference_policy = reference(self.model, self.dpo.ref_policy_placement)

    @property
    def ref_policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen reference weights by ``<chunk>.<parameter name>`` (where they live, not copies)."""
        return self._require_reference().state_dict()

    @ref_policy_state_dict.setter
    def ref_policy_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        # NeMo Aligner scripts assign the reference this way.
        if self.reference_policy is None:
            warnings.warn(f"preference_loss {list(self.preference_loss.names)} is reference-free: "
                          "the reference weights assigned to ref_policy_state_dict are not kept", stacklevel=2)
            return
        self.reference_policy.load_state_dict(weights)

    def _require_reference(self) -> ReferencePolicy:
        if self.reference_policy is None:
            raise ValueError(f"preference_loss {list(self.preference_loss.names)} is reference-free: "
                             "the model keeps no reference policy")
        return self.reference_policy

    # ----------------------------------------------------------------- forward
    def _forward_step_func(self, logprobs_only: bool, loss_scale=None):
        """The schedule's forward step over padded micro-batches (dicts) or ``PackedMicroBatch``es.

        ``loss_scale(pairs)``: for packed training, the factor turning a micro-batch's
        mean loss into its share of the global batch's mean (see ``_run_packed_schedule``).
        """
        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            packed = isinstance(batch, PackedMicroBatch)
            if packed:
                tokens, positions = batch.tokens, batch.position_ids
            else:
                tokens = _pair_rows(batch, "chosen", "rejected")
                positions = _pair_rows(batch, "position_ids", "rejected_position_ids") if "position_ids" in batch else (
                    torch.arange(tokens.shape[1]).expand_as(tokens)
                )
            device = next(model.parameters()).device
            chunk_size = self.dpo.log_prob_chunk_size
            gpt = model.module
            chunked = chunk_size is not None and gpt.post_process
            # Right-padded pairs need no mask: causal attention never looks ahead. Packed
            # rows pass their pair blocks (a CPU tensor) as the mask, attended block by block.
            mask = batch.blocks if packed else None
            with contextlib.ExitStack() as stack:
                if chunked:
                    stack.enter_context(_output_layer_passes_hidden_states(gpt))
                if packed:
                    stack.enter_context(_rotary_at_position_ids(gpt, positions.to(device)))
                output = model(tokens.to(device), positions.to(device), mask)

            def output_weight():
                # The weight GPTModel itself hands its output layer.
                return (gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights
                        else gpt.output_layer.weight)

            def token_logprobs(output):
                targets = tokens[:, 1:].to(output.device)
                if not chunked:
                    return vocab_parallel_logprobs(output[:, :-1], targets, self.vocab_size)
                return chunked_vocab_parallel_logprobs(output[:, :-1], output_weight(), targets, chunk_size,
                                                       self.vocab_size)

            def aligned_logprobs(output, logprobs):
                """WPO's per-token ``log p(y_t) - log sum_v p_v ** 2``, without gradient."""
                if not chunked:
                    return logprobs.detach() - vocab_parallel_log_sum_squared_probs(output[:, :-1], self.vocab_size)
                return logprobs.detach() - chunked_vocab_parallel_log_sum_squared_probs(
                    output[:, :-1], output_weight(), chunk_size, self.vocab_size)

            if logprobs_only:
                return output, lambda output: (torch.zeros(()), {"logprobs": token_logprobs(output).detach()})

            def loss_func(output):
                pi_logprobs = token_logprobs(output)
                dpo = self.dpo
                metrics = {}
                weighting = aligned_logprobs(output, pi_logprobs) if dpo.use_weighting else None
                if packed:
                    preference_loss, acc, sft_loss, logratios = self._packed_losses(
                        batch, pi_logprobs, metrics, weighting)
                    pairs = batch.num_pairs
                else:
                    preference_loss, acc, sft_loss, logratios = self._padded_losses(
                        batch, pi_logprobs, metrics, weighting)
                    pairs = logratios.shape[0] // 2
                loss = dpo.preference_loss_weight * preference_loss + dpo.sft_loss_weight * sft_loss
                # Optional metrics (log-prob means, mixture terms): value and count, so one a
                # custom loss_func does not report is left out rather than logged as 0.
                names = self.loss_metric_names()
                optional = torch.zeros(2 * len(names), dtype=torch.float64)
                for i, name in enumerate(names):
                    if name in metrics:
                        optional[i], optional[len(names) + i] = float(metrics[name]) * pairs, pairs
                return loss if loss_scale is None else loss * loss_scale(pairs), {
                    "pairs": pairs,
                    "sums": torch.stack([loss, preference_loss, sft_loss, acc]).detach().double() * pairs,
                    "optional": optional,
                    "logratios": logratios.detach(),
                }

            return output, loss_func

        return forward_step

    def _padded_losses(self, batch: dict, pi_logprobs: torch.Tensor, metrics: dict, weighting=None):
        """Preference loss, accuracy, SFT loss and per-sequence log-ratios of a padded micro-batch.

        ``metrics`` receives the optional per-micro-batch metrics (``loss_metric_names``);
        ``weighting``: WPO's per-token aligned log-probs when ``use_weighting``.
        """
        device = pi_logprobs.device
        labels = _pair_rows(batch, "chosen_labels", "rejected_labels")[:, 1:].to(device)
        ref_logprobs = self._reference_token_logprobs(
            _pair_rows(batch, *_REF_KEYS) if _REF_KEYS[0] in batch else None, pi_logprobs)
        gt_rewards = _pair_rows(batch, "chosen_rewards", "rejected_rewards").to(device)
        dpo = self.dpo
        logratios = self.get_reduced_masked_logps(
            pi_logprobs - ref_logprobs, labels, average_log_probs=dpo.preference_average_log_probs
        )
        preference_loss, acc = self.loss_func(
            pi_logprobs, ref_logprobs, labels, gt_rewards,
            average_log_probs=dpo.preference_average_log_probs, logratios=logratios, metrics=metrics,
            optional_inputs=self._optional_inputs(padded_segments(labels), (labels > -1).sum(-1), pi_logprobs,
                                                  ref_logprobs, weighting),
        )
        sft_loss = torch.zeros_like(preference_loss)
        if dpo.sft_loss_weight != 0:
            sft_loss = self.sft_loss_func(pi_logprobs, labels, average_log_probs=dpo.sft_average_log_probs)
        return preference_loss, acc, sft_loss, logratios

    def _packed_losses(self, batch: PackedMicroBatch, pi_logprobs: torch.Tensor, metrics: dict, weighting=None):
        """``_padded_losses`` of a packed micro-batch: per-sequence sums gathered by segment.

        ``loss_func`` gets the per-sequence log-ratios and log-probs (rows [all
        chosen; all rejected] as unpacked); its per-token arguments are the packed rows.
        """
        device = pi_logprobs.device
        segments = batch.target_segments().to(device)
        ref_logprobs = self._reference_token_logprobs(batch.ref_logprobs, pi_logprobs)
        sequences = 2 * batch.num_pairs
        dpo = self.dpo
        logratios = sequence_logprobs(pi_logprobs - ref_logprobs, segments, sequences,
                                      dpo.preference_average_log_probs)
        average = self.average_preference_inputs
        policy = sequence_logprobs(pi_logprobs, segments, sequences, average)
        lengths = sequence_logprobs(torch.ones_like(pi_logprobs), segments, sequences, False)
        sequence_logps = (
            policy,
            self._reference_sums(policy, logratios, dpo.preference_average_log_probs,
                                 lambda: sequence_logprobs(ref_logprobs, segments, sequences, average)),
            lengths,
        )
        preference_loss, acc = self.loss_func(
            pi_logprobs, ref_logprobs, batch.labels[:, 1:].to(device), batch.rewards.to(device),
            average_log_probs=dpo.preference_average_log_probs, logratios=logratios,
            sequence_logps=sequence_logps, metrics=metrics,
            optional_inputs=self._optional_inputs(segments, lengths, pi_logprobs, ref_logprobs, weighting),
        )
        sft_loss = torch.zeros_like(preference_loss)
        if dpo.sft_loss_weight != 0:
            chosen, _ = split_chosen_rejected(
                sequence_logprobs(pi_logprobs, segments, sequences, dpo.sft_average_log_probs))
            sft_loss = -chosen.mean(0)
        return preference_loss, acc, sft_loss, logratios

    def _reference_token_logprobs(self, ref_logprobs: torch.Tensor | None, pi_logprobs: torch.Tensor) -> torch.Tensor:
        """The batch's reference log-probs on the policy's device; zeros for a reference-free loss without them."""
        if ref_logprobs is not None:
            return ref_logprobs.to(pi_logprobs.device)
        if not self.preference_loss.reference_free:
            raise ValueError("the batch has no reference log-probs (ref_policy_log_probs_chosen/_rejected): "
                             "compute them with get_ref_policy_logprobs first")
        return torch.zeros_like(pi_logprobs, dtype=torch.float32)

    def _run_schedule(self, batch: dict, micro_batch_size: int, forward_only: bool, logprobs_only: bool):
        """This rank's micro-batch reports, and the ``PackingPlan`` when packing (else None)."""
        if self.packing.enabled:
            return self._run_packed_schedule(batch, forward_only, logprobs_only)
        pairs = batch["chosen"].shape[0]
        if pairs % micro_batch_size:
            # Only a last, partial validation batch gets here; one pair per
            # micro-batch keeps the fixed activation shape pipelines need.
            micro_batch_size = 1
        micro_batches = [_split_rows(batch, i, i + micro_batch_size) for i in range(0, pairs, micro_batch_size)]
        if parallel_state.get_pipeline_model_parallel_world_size() == 1 and "chosen_length" in batch:
            # Each micro-batch to its own longest row (pipelines need one shape per step).
            multiple = self._length_multiple()
            micro_batches = [_trim_to_longest(mb, multiple) for mb in micro_batches]
        if "chosen_length" in batch:
            computed = sum(2 * mb["chosen"].shape[0] * mb["chosen"].shape[1] for mb in micro_batches)
            real = int(batch["chosen_length"].sum() + batch["rejected_length"].sum())
            self.token_counts.add(TokenCounts(computed=computed, padding=computed - real))
        data = [iter(micro_batches) for _ in self.model] if len(self.model) > 1 else iter(micro_batches)
        return forward_backward(
            self.model,
            self._forward_step_func(logprobs_only),
            data,
            num_microbatches=len(micro_batches),
            seq_length=max(mb["chosen"].shape[1] for mb in micro_batches),
            micro_batch_size=2 * micro_batch_size,
            forward_only=forward_only,
        ), None

    def _length_multiple(self) -> int:
        """What rows are padded to a multiple of: ``pad_length_to_multiple_of``, and TP under sequence parallelism."""
        config = self.model[0].config
        multiple = self.packing.length_multiple
        if config.sequence_parallel:
            multiple = math.lcm(multiple, config.tensor_model_parallel_size)
        return multiple

    def _run_packed_schedule(self, batch: dict, forward_only: bool, logprobs_only: bool):
        """Pack this rank's pairs into micro-batches of one row of at most ``pack_tokens`` tokens and run them.

        With ``shared_prompt`` each pair's block holds its prompt once (``data/packing.py``).

        The number of micro-batches ``M`` depends on the data, so it differs between
        DP ranks and steps. megatron's schedule divides each micro-batch's loss by
        ``M`` and DDP averages gradients over the ``D`` DP ranks; a micro-batch of
        ``p`` pairs with mean loss ``l`` therefore returns ``l * p * M * D / N``
        (``N``: the global batch's pairs), so the gradient is that of the mean loss
        over all ``N`` pairs, as unpacked. With pipeline parallelism every row of
        the step is padded to the step's longest (one activation shape); first-fit
        decreasing leaves at most one pack half full or less, so at most one pack
        carries more padding than tokens. Shared prompts change only the blocks'
        sizes, not this.
        """
        multiple = self._length_multiple()
        pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        plan = pack_padded_batch(batch, self.packing.pack_tokens, multiple, common_length=pipelined,
                                 shared_prompt=self.packing.shared_prompt)
        self.token_counts.add(plan.counts)
        micro_batches = plan.micro_batches
        loss_scale = None
        if not forward_only:
            dp_group = parallel_state.get_data_parallel_group()
            total_pairs = all_reduce(torch.tensor(float(batch["chosen"].shape[0]), dtype=torch.float64),
                                     group=dp_group).item()
            factor = len(micro_batches) * parallel_state.get_data_parallel_world_size() / total_pairs
            loss_scale = lambda pairs: pairs * factor  # noqa: E731
        data = [iter(micro_batches) for _ in self.model] if len(self.model) > 1 else iter(micro_batches)
        reports = forward_backward(
            self.model,
            self._forward_step_func(logprobs_only, loss_scale),
            data,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        return reports, plan

    # ------------------------------------------------------------- public API
    def get_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        """Forward (and backward unless ``forward_only``) one global batch of this DP rank.

        Metrics are over the whole global batch (every micro-batch, every DP
        rank) and identical on every rank. ``batch`` holds the collated pairs
        plus ``ref_policy_log_probs_chosen/rejected`` from ``augment_dataloader``.
        """
        pairs = batch["chosen"].shape[0]
        self._update_loss_state = not forward_only  # bco_pair's running mean moves in training only
        reports = self._run_schedule(batch, self.cfg.micro_batch_size, forward_only, False)[0] if pairs else []
        return self._reduce_metrics(reports)

    def _reduce_metrics(self, reports: list[dict]) -> tuple[float, dict[str, float]]:
        """Loss and metrics of the global batch from this rank's micro-batch reports."""
        names = self.loss_metric_names()
        # loss, preference, sft, acc (x pairs), pairs; then each optional metric (x pairs) and its pairs
        totals = torch.zeros(5 + 2 * len(names), dtype=torch.float64)
        logratios = torch.zeros(0, 2)
        if reports:
            totals[:4] = torch.stack([r["sums"].double().cpu() for r in reports]).sum(0)
            totals[4] = sum(r["pairs"] for r in reports)
            totals[5:] = torch.stack([r["optional"] for r in reports]).sum(0)
            logratios = torch.cat([torch.stack(split_chosen_rejected(r["logratios"].float().cpu()), 1) for r in reports])
        totals, logratios = reduce_global_batch(totals, logratios)
        loss, preference_loss, sft_loss, acc = (totals[:4] / max(totals[4].item(), 1.0)).tolist()
        metrics = {"loss": loss, "sft_loss": sft_loss, "preference_loss": preference_loss, "acc": acc}
        stats = reward_metrics(logratios[:, 0], logratios[:, 1], self.dpo.ref_policy_kl_penalty)
        metrics.update({key: value.item() for key, value in stats.items()})
        metrics["rewards_margin_mean"] = metrics["rewards_chosen_mean"] - metrics["rewards_rejected_mean"]
        optional_sums, optional_pairs = totals[5:5 + len(names)], totals[5 + len(names):]
        metrics.update({name: (value / count).item()
                        for name, value, count in zip(names, optional_sums, optional_pairs) if count > 0})
        return loss, metrics

    def loss_metric_names(self) -> list[str]:
        """Per-micro-batch metrics besides NeMo Aligner's: log-prob means and each loss term (``loss_<name>``)."""
        terms = list(self.preference_loss.names)
        if self.preference_loss.settings.rpo_alpha is not None:
            terms.append(RPO_TERM)
        return ["logps_chosen_mean", "logps_rejected_mean", *(f"loss_{name}" for name in terms)]

    @torch.no_grad()
    def get_logprob_batch(self, batch: dict) -> torch.Tensor:
        """Per-token log-probs ``[2B, S-1]`` (all chosen rows, then all rejected), on every rank.

        With packing, positions past a sequence's end hold 0; with shared prompts a
        rejected row's prompt positions hold the values computed for its chosen row.
        """
        pairs, seq_length = batch["chosen"].shape
        micro = self.dpo.log_prob_forward_micro_batch_size or self.cfg.micro_batch_size
        for chunk in self.model:
            chunk.eval()
        reports, plan = self._run_schedule(batch, micro, forward_only=True, logprobs_only=True) if pairs else ([], None)
        logprobs = torch.empty(2 * pairs, seq_length - 1, dtype=torch.float32)
        if reports and plan is not None:
            # Back to the padded layout; padding positions hold 0.
            logprobs = plan.unpack_token_values([r["logprobs"].cpu() for r in reports])
        elif reports:
            # Micro-batches cut to their longest row come back padded with 0.
            widths = [r["logprobs"].shape[1] for r in reports]
            chosen, rejected = zip(*(split_chosen_rejected(
                torch.nn.functional.pad(r["logprobs"].cpu(), (0, seq_length - 1 - w))) for r, w in zip(reports, widths)))
            logprobs = torch.cat([*chosen, *rejected])
        return broadcast(
            logprobs,
            parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )

    def get_ref_policy_logprobs(self, batch: dict) -> torch.Tensor:
        """``get_logprob_batch`` with the frozen reference weights put in the policy's place."""
        with self._require_reference().active():
            return self.get_logprob_batch(batch)

    def get_reduced_masked_logps(self, logps, labels, cu_seqlens=None, average_log_probs=False):
        """Per-sequence sum (or mean) of token log-probs where ``labels`` is not -100."""
        if cu_seqlens is not None:
            raise ValueError("packed sequences are not supported by this model yet")
        return masked_sequence_logprobs(logps, labels > -1, average=average_log_probs)

    def loss_func(self, pi_logprobs, ref_logprobs, labels, gt_rewards, cu_seqlens=None, average_log_probs=False,
                  logratios=None, sequence_logps=None, metrics=None, optional_inputs=None):
        """Preference loss of one micro-batch (mean over pairs) and its accuracy.

        Override in a subclass for a custom loss; inputs are per-token, rows
        [all chosen; all rejected], labels already aligned with the log-probs
        (with a reference-free loss ``ref_logprobs`` holds zeros).
        ``logratios``: the per-sequence policy-minus-reference log-probs when the
        caller already has them (the training step passes them, so they are
        computed once); derived from the token log-probs when None.
        ``sequence_logps``: per-sequence ``(policy, reference or None, response
        lengths)`` when the caller has them (packed rows); derived from the
        token log-probs and labels when None. ``metrics``: a dict this fills
        with the optional metrics of :meth:`loss_metric_names`. ``optional_inputs``:
        the per-sequence inputs ``ld_alpha`` and ``use_weighting`` read (``_optional_inputs``).
        """
        if logratios is None:
            logratios = self.get_reduced_masked_logps(pi_logprobs - ref_logprobs, labels, cu_seqlens, average_log_probs)
        if sequence_logps is None:
            average = self.average_preference_inputs
            policy = self.get_reduced_masked_logps(pi_logprobs, labels, cu_seqlens, average)
            sequence_logps = (
                policy,
                self._reference_sums(policy, logratios, average_log_probs, lambda: self.get_reduced_masked_logps(
                    ref_logprobs, labels, cu_seqlens, average)),
                (labels > -1).sum(-1),
            )
        inputs = self.preference_loss_inputs(*sequence_logps, gt_rewards, optional_inputs)
        output = self.preference_loss(inputs)
        if metrics is not None:
            metrics.update({f"loss_{name}": value.detach().float().mean() for name, value in output.terms.items()})
            metrics.update(logps_metrics(inputs))
        chosen, rejected = split_chosen_rejected(logratios)
        # The mean in float64: k equal per-pair values average to exactly that value (ln 2 at step 0).
        return output.loss.double().mean(0).float(), preference_accuracy(chosen, rejected)

    def _reference_sums(self, policy, logratios, logratios_averaged: bool, compute):
        """Per-sequence reference log-probs for the loss inputs; None for a reference-free loss.

        When the log-ratios were reduced like the policy's log-probs, the reference is
        ``policy - logratio`` in float64: then the losses' ``policy - reference`` is
        exactly the fp32 sum of per-token differences NeMo Aligner's losses use (two
        separate fp32 sums of large log-probs would lose digits). ``compute()`` otherwise.
        """
        if self.preference_loss.reference_free:
            return None
        if logratios_averaged != self.average_preference_inputs:
            return compute()
        return policy.detach().double() - logratios.detach().double()

    def _optional_inputs(self, segments, lengths, pi_logprobs, ref_logprobs, weighting) -> dict:
        """The per-sequence inputs of ``ld_alpha`` / ``use_weighting`` (empty when neither is set)."""
        reference = None if self.preference_loss.reference_free else ref_logprobs
        return optional_sequence_inputs(segments, lengths, pi_logprobs, reference, weighting, self.dpo.ld_alpha)

    def preference_loss_inputs(self, policy_logps, reference_logps, lengths, gt_rewards,
                               optional=None) -> PreferenceLossInputs:
        """``PreferenceLossInputs`` from per-sequence values, rows [all chosen; all rejected].

        ``optional``: more per-sequence values by ``OPTIONAL_INPUT_FIELDS`` name.
        """
        policy_chosen, policy_rejected = split_chosen_rejected(policy_logps)
        reference_chosen, reference_rejected = (None, None) if reference_logps is None else (
            split_chosen_rejected(reference_logps.detach()))
        chosen_lengths, rejected_lengths = split_chosen_rejected(lengths)
        gt_chosen, gt_rejected = split_chosen_rejected(gt_rewards)
        return PreferenceLossInputs(
            policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
            beta=self.dpo.ref_policy_kl_penalty,
            reference_chosen_logps=reference_chosen, reference_rejected_logps=reference_rejected,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            gt_rewards_chosen=gt_chosen, gt_rewards_rejected=gt_rejected, gt_reward_scale=self.dpo.gt_reward_scale,
            update_state=self._update_loss_state,
            **{field: half for name, values in (optional or {}).items()
               for field, half in zip(OPTIONAL_INPUT_FIELDS[name], split_chosen_rejected(values))},
        )

    def sft_loss_func(self, pi_logprobs, labels, cu_seqlens=None, average_log_probs=False):
        """Negative log-likelihood of the chosen responses (mean over pairs)."""
        chosen, _ = split_chosen_rejected(self.get_reduced_masked_logps(pi_logprobs, labels, cu_seqlens, average_log_probs))
        return -chosen.mean(0)

    def prepare_for_training_step(self) -> None:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()

    def finish_training_step(self) -> None:
        """Kept for NeMo Aligner parity: gradients are already reduced over DP (and
        tied embeddings over PP) by the schedule's ``finalize_model_grads``."""

    def prepare_for_validation_step(self) -> None:
        for chunk in self.model:
            chunk.eval()

    def finish_validation_step(self) -> None:
        for chunk in self.model:
            chunk.train()

