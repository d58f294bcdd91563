"""Per-sequence loss inputs only some settings read: LD-DPO's shared-length sums, WPO's aligned log-probs.

Both come from per-token values and a ``[rows, tokens]`` map of the sequence each
predicted token counts for (-1 where none): a padded micro-batch maps row ``r``'s
response tokens to sequence ``r``, a packed one uses its target segments. The
sequences are ``[all chosen; all rejected]``, so sequence ``k`` and ``P + k`` are a pair.
"""

from __future__ import annotations

import torch

from nemo_dpo.data.packing import sequence_logprobs

# ``PreferenceLossInputs`` fields each per-sequence value fills, chosen half then rejected half.
OPTIONAL_INPUT_FIELDS = {
    "policy_shared": ("policy_chosen_shared_logps", "policy_rejected_shared_logps"),
    "reference_shared": ("reference_chosen_shared_logps", "reference_rejected_shared_logps"),
    "weighting": ("chosen_weighting_logps", "rejected_weighting_logps"),
}


def leading_tokens(segments: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``segments`` kept at the first ``limit[s]`` counted tokens of each sequence ``s`` (row-major order), -1 elsewhere."""
    flat = segments.flatten()
    where = (flat >= 0).nonzero().squeeze(1)
    ids = flat[where]
    order = torch.argsort(ids, stable=True)
    _, counts = torch.unique_consecutive(ids[order], return_counts=True)
    group_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - group_start
    keep = rank < limit.to(ids.device)[ids]
    out = torch.full_like(flat, -1)
    out[where[keep]] = ids[keep]
    return out.view_as(segments)


def padded_segments(labels: torch.Tensor) -> torch.Tensor:
    """The segment map of padded rows: row ``r``'s trained positions count for sequence ``r``."""
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return torch.where(labels > -1, rows, -1)


def optional_sequence_inputs(segments: torch.Tensor, lengths: torch.Tensor, policy: torch.Tensor,
                             reference: torch.Tensor | None, weighting: torch.Tensor | None,
                             ld_alpha: float | None) -> dict[str, torch.Tensor]:
    """Per-sequence ``[2P]`` inputs named as ``OPTIONAL_INPUT_FIELDS``, those the settings need.

    ``lengths``: response tokens per sequence. ``policy``/``reference``: per-token
    log-probs (``reference`` None for a reference-free loss). ``weighting``: per-token
    ``log p(y_t) - log sum_v p_v ** 2`` when WPO weighting is on, else None.
    """
    sequences = lengths.shape[0]
    out = {}
    if ld_alpha is not None:
        pairs = sequences // 2
        shared_length = torch.minimum(lengths[:pairs], lengths[pairs:]).repeat(2)
        shared = leading_tokens(segments, shared_length)
        out["policy_shared"] = sequence_logprobs(policy, shared, sequences, average=False)
        if reference is not None:
            out["reference_shared"] = sequence_logprobs(reference, shared, sequences, average=False)
    if weighting is not None:
        out["weighting"] = sequence_logprobs(weighting, segments, sequences, average=False)
    return out
