"""Per-token log-probabilities from vocab-parallel logits.

Each tensor-parallel rank holds a contiguous slice of the vocabulary dimension of
the logits. The log-softmax is computed the numerically stable way ("higher
stability"): the global max is subtracted before exponentiating and the sum of
exponentials is reduced across ranks in fp32, whatever the logits' dtype. Entries
past the real vocabulary (the padding that makes the vocab divisible by TP) get
no probability mass, so results match an unpadded model exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        vocab_shard = logits.shape[-1]
        rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
        start = rank * vocab_shard
        shifted = logits.to(torch.float32, copy=True)
        real_in_shard = min(max(vocab_size - start, 0), vocab_shard)
        if real_in_shard < vocab_shard:
            shifted[..., real_in_shard:] = float("-inf")

        global_max = _all_reduce(shifted.amax(dim=-1), dist.ReduceOp.MAX, group)
        shifted.sub_(global_max.unsqueeze(-1))

        local_target = target - start
        in_shard = (local_target >= 0) & (local_target < vocab_shard)
        local_target = local_target.clamp(0, vocab_shard - 1)
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
        ctx.save_for_backward(probs, local_target, in_shard)
        ctx.logits_dtype = logits.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        probs, local_target, in_shard = ctx.saved_tensors
        # d logp[target] / d logit[j] = 1{j == target} - softmax[j]
        grad = probs.mul_(-grad_output.unsqueeze(-1))
        hit = (grad_output * in_shard).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), hit)
        return grad.to(ctx.logits_dtype), None, None, None


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
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    padded_vocab = logits.shape[-1] * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if vocab_size > padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' vocabulary {padded_vocab}")
    return _VocabParallelLogProbs.apply(logits, target, vocab_size, group)
