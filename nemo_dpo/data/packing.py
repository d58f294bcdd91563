"""Packed micro-batches: whole DPO pairs laid end to end in rows, and packing them on the fly.

The packed micro-batch format (``PackedMicroBatch``) is what the model's packed
forward takes; any source of packed data (on-the-fly packing below, or a reader
of NeMo Aligner's packed ``.npy`` files) produces it.

One micro-batch holds ``P`` whole pairs in ``R`` rows of ``T`` tokens. Every row
is a concatenation of whole sequences followed by padding. Its sequences are
numbered ``0..2P-1`` in the canonical DPO order: sequence ``k < P`` is the chosen
response of the micro-batch's pair ``k``, sequence ``P + k`` the rejected one of
the same pair, so per-sequence results come out as ``[all chosen; all rejected]``
like the rows of an unpacked micro-batch. Per token:

- ``tokens``: token ids (padding: any id in the vocabulary; it is never attended by,
  nor predicts, a real token);
- ``labels``: the token id where the token is trained on, ``-100`` elsewhere
  (prompt, padding), like the unpacked ``*_labels``;
- ``position_ids``: positions restarting at 0 at the start of every sequence;
- ``segment_ids``: the sequence number (above) of the token, ``-1`` for padding.
  A token attends to the earlier tokens of its own sequence only.

Per sequence: ``rewards`` ``[2P]`` (ground-truth rewards, chosen then rejected).
``ref_logprobs`` ``[R, T-1]``: the reference log-prob of ``tokens[:, 1:]``
aligned as the policy's are, or None before the reference pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = [
    "PackedMicroBatch",
    "PackingPlan",
    "block_causal_mask",
    "first_fit_decreasing",
    "pack_padded_batch",
    "sequence_logprobs",
]


@dataclass(frozen=True)
class PackedMicroBatch:
    """One packed micro-batch (see the module docstring for the layout)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    rewards: torch.Tensor
    num_pairs: int
    ref_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        shape = self.tokens.shape
        for name in ("labels", "position_ids", "segment_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"packed micro-batch: {name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"tokens {tuple(shape)}")
        if self.rewards.shape != (2 * self.num_pairs,):
            raise ValueError(f"packed micro-batch: rewards must have 2 * num_pairs = {2 * self.num_pairs} values")
        if self.ref_logprobs is not None and self.ref_logprobs.shape != (shape[0], shape[1] - 1):
            raise ValueError("packed micro-batch: ref_logprobs must be [rows, tokens - 1]")

    def with_ref_logprobs(self, ref_logprobs: torch.Tensor) -> "PackedMicroBatch":
        return replace(self, ref_logprobs=ref_logprobs)

    def target_segments(self) -> torch.Tensor:
        """``[R, T-1]``: the sequence each predicted token ``tokens[:, 1:]`` counts for, -1 where none.

        A position counts when its label is trained on and it continues the
        sequence of the token before it (a sequence's first token is never predicted).
        """
        seg = self.segment_ids
        counts = (self.labels[:, 1:] > -1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
        return torch.where(counts, seg[:, 1:], -1)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[R, 1, T, T]`` boolean mask, True where attention is NOT allowed (megatron's convention).

    A token attends to itself and the earlier tokens of its own sequence;
    padding (-1) attends to earlier padding only, so no row of scores is empty.
    """
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal).unsqueeze(1)


def sequence_logprobs(token_logprobs: torch.Tensor, target_segments: torch.Tensor, num_sequences: int,
                      average: bool) -> torch.Tensor:
    """fp32 ``[num_sequences]`` log-prob of each sequence: the sum (or mean) of its counted tokens."""
    counted = target_segments >= 0
    ids = target_segments[counted]
    values = token_logprobs.float()[counted]
    summed = torch.zeros(num_sequences, dtype=torch.float32, device=values.device).index_add(0, ids, values)
    if not average:
        return summed
    counts = torch.zeros(num_sequences, dtype=torch.float32, device=values.device).index_add(
        0, ids, torch.ones_like(values))
    # A sequence with no loss tokens averages to 0, as unpacked.
    return summed / counts.clamp(min=1)


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` in bins of total at most ``capacity``, first-fit over decreasing sizes.

    Deterministic (ties keep index order). At most one bin ends up half full or less.
    """
    return first_fit(sizes, capacity, sorted(range(len(sizes)), key=lambda i: -sizes[i]))


def first_fit(sizes: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Indices of ``sizes`` in bins of total at most ``capacity``, each put in the first bin it fits, in ``order``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = sizes[index]
        if size > capacity:
            raise ValueError(f"a pair of {size} tokens does not fit model.data.pack_tokens={capacity}")
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(capacity - size)
    return bins


@dataclass(frozen=True)
class PackingPlan:
    """Packed micro-batches of a padded global batch and where each packed token came from.

    ``sources[m]``: ``(rows, cols, dst_cols)`` of micro-batch ``m``: padded-batch
    row (``[all chosen; all rejected]``) and column of each packed token, and its
    column in the packed row (micro-batches have one row).
    """

    micro_batches: list[PackedMicroBatch]
    sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    padded_shape: tuple[int, int]

    def pack_token_values(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values aligned with the padded ``tokens[:, 1:]`` -> each micro-batch's ``[1, T-1]``."""
        out = []
        for mb, (rows, cols, dst) in zip(self.micro_batches, self.sources):
            packed = torch.zeros(1, mb.tokens.shape[1] - 1, dtype=values.dtype)
            keep = cols > 0
            packed[0, dst[keep] - 1] = values[rows[keep], cols[keep] - 1]
            out.append(packed)
        return out

    def unpack_token_values(self, packed: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``pack_token_values``: ``[2B, S-1]``, 0 where the padded batch has padding."""
        rows_total, length = self.padded_shape
        out = torch.zeros(rows_total, length - 1, dtype=packed[0].dtype if packed else torch.float32)
        for values, (rows, cols, dst) in zip(packed, self.sources):
            keep = cols > 0
            out[rows[keep], cols[keep] - 1] = values[0, dst[keep] - 1]
        return out


def pack_padded_batch(batch: dict, pack_tokens: int, length_multiple: int = 1,
                      common_length: bool = False) -> PackingPlan:
    """Pack a collated (padded) global batch into micro-batches of one row of at most ``pack_tokens`` tokens.

    Whole pairs go first-fit-decreasing by ``chosen_length + rejected_length``;
    the pair's chosen sequence then its rejected one. Each row is padded to a
    multiple of ``length_multiple`` (the TP size under sequence parallelism), and
    with ``common_length`` (pipeline parallelism: one activation shape per step)
    to the longest row of the batch. Position ids come from the batch's
    ``position_ids``/``rejected_position_ids`` when present, else restart at 0
    per sequence. Reference log-probs, when present, are packed too.
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    pairs, width = chosen.shape
    tokens = torch.cat([chosen, rejected])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    if "position_ids" in batch:
        positions = torch.cat([batch["position_ids"], batch["rejected_position_ids"]])
    else:
        positions = torch.arange(width).expand(2 * pairs, width)
    lengths = torch.cat([batch["chosen_length"], batch["rejected_length"]]).tolist()
    rewards = torch.cat([batch["chosen_rewards"], batch["rejected_rewards"]]).float()
    has_ref = "ref_policy_log_probs_chosen" in batch
    if has_ref:
        ref = torch.cat([batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"]])
    bins = first_fit_decreasing([lengths[i] + lengths[pairs + i] for i in range(pairs)], pack_tokens)

    def round_up(n: int) -> int:
        return -(-n // length_multiple) * length_multiple

    row_lengths = [round_up(sum(lengths[i] + lengths[pairs + i] for i in members)) for members in bins]
    common = max(row_lengths, default=0)
    micro_batches, sources = [], []
    for members, row_length in zip(bins, row_lengths):
        length = common if common_length else row_length
        count = len(members)
        # Canonical sequence order: chosen of each member pair, then their rejected.
        order = [i for i in members] + [pairs + i for i in members]
        src_rows, src_cols, dst_cols, segments = [], [], [], []
        start = 0
        for k in range(count):
            for seq in (k, count + k):
                row, n = order[seq], lengths[order[seq]]
                src_rows.append(torch.full((n,), row, dtype=torch.long))
                src_cols.append(torch.arange(n))
                dst_cols.append(torch.arange(start, start + n))
                segments.append(torch.full((n,), seq, dtype=torch.long))
                start += n
        rows, cols, dst = torch.cat(src_rows), torch.cat(src_cols), torch.cat(dst_cols)

        def place(values: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((1, length), fill, dtype=values.dtype)
            out[0, dst] = values
            return out

        mb = PackedMicroBatch(
            tokens=place(tokens[rows, cols], 0),
            labels=place(labels[rows, cols], -100),
            position_ids=place(positions[rows, cols], 0),
            segment_ids=place(torch.cat(segments), -1),
            rewards=rewards[order],
            num_pairs=count,
        )
        micro_batches.append(mb)
        sources.append((rows, cols, dst))
    plan = PackingPlan(micro_batches, sources, (2 * pairs, width))
    if has_ref:
        plan = replace(plan, micro_batches=[mb.with_ref_logprobs(r) for mb, r in
                                            zip(plan.micro_batches, plan.pack_token_values(ref))])
    return plan
