"""Per-token log-probabilities from vocab-parallel logits.

Each tensor-parallel rank holds a contiguous slice of the vocabulary dimension of
the logits. The log-softmax is computed the numerically stable way ("higher
stability"): the global max is subtracted before exponentiating and the sum of
exponentials is reduced across ranks in fp32, whatever the logits' dtype. Entries
past the real vocabulary (the padding that makes the vocab divisible by TP) get
no probability mass, so results match an unpadded model exactly.

``chunked_vocab_parallel_logprobs`` computes the same values from hidden states
and the output weight shard, a few tokens at a time, so that the fp32 logits of
a whole micro-batch never exist at once (backward recomputes them per chunk).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _shard_start(vocab_shard: int, group) -> int:
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * vocab_shard


def _masked_fp32(logits: torch.Tensor, vocab_size: int, start: int) -> torch.Tensor:
    """An fp32 copy of ``logits`` with the vocab padding at -inf (no probability mass)."""
    vocab_shard = logits.shape[-1]
    shifted = logits.to(torch.float32, copy=True)
    real_in_shard = min(max(vocab_size - start, 0), vocab_shard)
    if real_in_shard < vocab_shard:
        shifted[..., real_in_shard:] = float("-inf")
    return shifted


def _local_target(target: torch.Tensor, start: int, vocab_shard: int):
    """Targets as indices into this shard (clamped) and whether each one lies in it."""
    local_target = target - start
    in_shard = (local_target >= 0) & (local_target < vocab_shard)
    return local_target.clamp(0, vocab_shard - 1), in_shard


def _log_softmax_at_target(shifted: torch.Tensor, target: torch.Tensor, start: int, group):
    """Log-probs of ``target`` from masked fp32 logits; ``shifted`` becomes the softmax in place.

    Returns the log-probs, the softmax, the local targets and their in-shard mask,
    and the global max and sum of exponentials (what backward needs to rebuild the softmax).
    """
    global_max = _all_reduce(shifted.amax(dim=-1), dist.ReduceOp.MAX, group)
    shifted.sub_(global_max.unsqueeze(-1))

    local_target, in_shard = _local_target(target, start, shifted.shape[-1])
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = _all_reduce(
        torch.where(in_shard, target_logit, torch.zeros_like(target_logit)),
        dist.ReduceOp.SUM,
        group,
    )

    probs = shifted.exp_()
    sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
    logprobs = target_logit - sum_exp.log()

    probs.div_(sum_exp.unsqueeze(-1))
    return logprobs, probs, local_target, in_shard, global_max, sum_exp


def _logits_grad(probs, local_target, in_shard, grad_output) -> torch.Tensor:
    """Gradient of the logits, in place on ``probs``."""
    # d logp[target] / d logit[j] = 1{j == target} - softmax[j]
    grad = probs.mul_(-grad_output.unsqueeze(-1))
    hit = (grad_output * in_shard).unsqueeze(-1)
    return grad.scatter_add_(-1, local_target.unsqueeze(-1), hit)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        start = _shard_start(logits.shape[-1], group)
        shifted = _masked_fp32(logits, vocab_size, start)
        logprobs, probs, local_target, in_shard, _, _ = _log_softmax_at_target(shifted, target, start, group)
        ctx.save_for_backward(probs, local_target, in_shard)
        ctx.logits_dtype = logits.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        probs, local_target, in_shard = ctx.saved_tensors
        return _logits_grad(probs, local_target, in_shard, grad_output).to(ctx.logits_dtype), None, None, None


class _ChunkedVocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size, group, chunk_size):
        start = _shard_start(weight.shape[0], group)
        logprobs = torch.empty(target.shape, dtype=torch.float32, device=hidden.device)
        global_max, sum_exp = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for rows in _chunks(target.shape[0], chunk_size):
            shifted = _masked_fp32(F.linear(hidden[rows], weight), vocab_size, start)
            logprobs[rows], _, _, _, global_max[rows], sum_exp[rows] = _log_softmax_at_target(
                shifted, target[rows], start, group
            )
        ctx.save_for_backward(hidden, weight, target, global_max, sum_exp)
        ctx.vocab_size, ctx.group, ctx.chunk_size, ctx.start = vocab_size, group, chunk_size, start
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, target, global_max, sum_exp = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulator: summing bf16 partial weight grads chunk by chunk would lose bits.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for rows in _chunks(target.shape[0], ctx.chunk_size):
            # The same ops as forward, with the saved max and sum: the same softmax, no collectives.
            probs = _masked_fp32(F.linear(hidden[rows], weight), ctx.vocab_size, ctx.start)
            probs.sub_(global_max[rows].unsqueeze(-1)).exp_().div_(sum_exp[rows].unsqueeze(-1))
            local_target, in_shard = _local_target(target[rows], ctx.start, weight.shape[0])
            grad_logits = _logits_grad(probs, local_target, in_shard, grad_output[rows]).to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().float(), hidden[rows].float())  # in place: no [vocab, hidden] temporary
        # As ColumnParallelLinear does (allreduce_dgrad): hidden states are replicated
        # over TP, so their gradient is the sum of every vocab shard's contribution.
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def _chunks(length: int, chunk_size: int):
    return (slice(lo, lo + chunk_size) for lo in range(0, length, chunk_size))


def _resolve_group_and_vocab(vocab_shard: int, vocab_size: int | None, group):
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    padded_vocab = vocab_shard * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if vocab_size > padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' vocabulary {padded_vocab}")
    return group, vocab_size


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """fp32 ``log_softmax(full_logits)[..., target]`` from this rank's vocab shard.

    Args:
        logits: ``[..., vocab_shard]``, this rank's slice of the (padded) vocabulary.
        target: ``[...]`` token ids in the global vocabulary (never padding ids).
        vocab_size: real vocabulary size; entries at or past it are ignored.
            ``None`` means every entry is real.
        group: tensor-parallel group; defaults to megatron's when it is initialised.
    """
    group, vocab_size = _resolve_group_and_vocab(logits.shape[-1], vocab_size, group)
    return _VocabParallelLogProbs.apply(logits, target, vocab_size, group)


def chunked_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    chunk_size: int,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``vocab_parallel_logprobs(hidden @ weight.T, target)``, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[..., hidden]`` states entering the output layer, replicated over TP.
        weight: ``[vocab_shard, hidden]``, this rank's shard of the output weight.
        target: ``[...]`` token ids in the global vocabulary (never padding ids).
        chunk_size: tokens whose logits exist at once (forward and backward).
        vocab_size, group: as for ``vocab_parallel_logprobs``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    group, vocab_size = _resolve_group_and_vocab(weight.shape[0], vocab_size, group)
    flat = _ChunkedVocabParallelLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), vocab_size, group, chunk_size
    )
    return flat.view(target.shape)


def _log_sum_squared_probs(shifted: torch.Tensor, group) -> torch.Tensor:
    """``log sum_v softmax(z)_v ** 2`` per token from masked fp32 logits ``shifted`` (modified in place).

    ``= log sum exp(2 (z - m)) - 2 log sum exp(z - m)`` with ``m`` the global max,
    both sums reduced over the vocab shards.
    """
    global_max = _all_reduce(shifted.amax(dim=-1), dist.ReduceOp.MAX, group)
    shifted.sub_(global_max.unsqueeze(-1))
    sum_exp = _all_reduce(shifted.exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    sum_exp_squared = _all_reduce(shifted.mul_(2).exp_().sum(dim=-1), dist.ReduceOp.SUM, group)
    return sum_exp_squared.log() - 2 * sum_exp.log()


@torch.no_grad()
def vocab_parallel_log_sum_squared_probs(
    logits: torch.Tensor, vocab_size: int | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """fp32 ``log sum_v p_v ** 2`` of each token's full next-token distribution, without gradient.

    WPO's aligned log-prob of a token is its log-prob minus this. Arguments as
    for ``vocab_parallel_logprobs``.
    """
    group, vocab_size = _resolve_group_and_vocab(logits.shape[-1], vocab_size, group)
    start = _shard_start(logits.shape[-1], group)
    return _log_sum_squared_probs(_masked_fp32(logits, vocab_size, start), group)


@torch.no_grad()
def chunked_vocab_parallel_log_sum_squared_probs(
    hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int, vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``vocab_parallel_log_sum_squared_probs(hidden @ weight.T)``, ``chunk_size`` tokens at a time."""
    group, vocab_size = _resolve_group_and_vocab(weight.shape[0], vocab_size, group)
    start = _shard_start(weight.shape[0], group)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    for rows in _chunks(flat.shape[0], chunk_size):
        out[rows] = _log_sum_squared_probs(_masked_fp32(F.linear(flat[rows], weight), vocab_size, start), group)
    return out.view(hidden.shape[:-1])
