"""Packed micro-batches: whole DPO pairs laid end to end in rows, and packing them on the fly.

The packed micro-batch format (``PackedMicroBatch``) is what the model's packed
forward takes; any source of packed data (on-the-fly packing below, or a reader
of NeMo Aligner's packed ``.npy`` files) produces it.

One micro-batch holds ``P`` whole pairs in ``R`` rows of ``T`` tokens. Every row
is a sequence of contiguous pair blocks followed by padding. Its sequences are
numbered ``0..2P-1`` in the canonical DPO order: sequence ``k < P`` is the chosen
response of the micro-batch's pair ``k``, sequence ``P + k`` the rejected one of
the same pair, so per-sequence results come out as ``[all chosen; all rejected]``
like the rows of an unpacked micro-batch.

A pair's block is ``[shared | first | second]``: ``shared + first`` tokens are the
chosen sequence, ``second`` tokens the rejected one's tokens from index
``shared`` on. Unshared pairs have ``shared = 0`` (chosen then rejected); with a
shared prompt the rejected response's first ``shared`` tokens are those of the
chosen and are computed once. Attention (``blocks``): ``shared + first`` tokens
are causal among themselves; a ``second`` token attends to the ``shared`` tokens
and to the earlier ``second`` tokens, never to the ``first`` ones; padding to
nothing (the attention returns 0 there). Per token:

- ``tokens``: token ids (padding: any id in the vocabulary);
- ``labels``: the token id where the token is trained on, ``-100`` elsewhere
  (prompt, padding), like the unpacked ``*_labels``;
- ``position_ids``: each sequence's own positions (a rejected response's continue
  from the prompt it shares);
- ``segment_ids``: the sequence number (above) of the token, ``-1`` for padding;
  a shared prompt is numbered as its chosen sequence.

``blocks``: ``[N, 5]`` int64 on the CPU, one line ``(row, start, shared, first,
second)`` per pair block, what ``SDPACoreAttention`` takes as its
``attention_mask`` (an integer tensor on the CPU: megatron-core hands the mask
to the core attention unchanged, also through activation recomputation, which
saves it as a tensor, and each pipeline stage gets it from its own forward step).
Per sequence: ``rewards`` ``[2P]`` (ground-truth rewards, chosen then rejected).
``ref_logprobs`` ``[R, T-1]``: the reference log-prob of ``tokens[:, 1:]``
aligned as the policy's are, or None before the reference pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

__all__ = [
    "BLOCK_COLUMNS",
    "PackedMicroBatch",
    "PackingPlan",
    "TokenCounts",
    "ValueSources",
    "dense_block_mask",
    "first_fit_decreasing",
    "pack_padded_batch",
    "sequence_logprobs",
    "shared_prompt_lengths",
]

# The columns of ``PackedMicroBatch.blocks``.
BLOCK_COLUMNS = ("row", "start", "shared", "first", "second")


@dataclass(frozen=True)
class PackedMicroBatch:
    """One packed micro-batch (see the module docstring for the layout)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    blocks: torch.Tensor
    rewards: torch.Tensor
    num_pairs: int
    ref_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        shape = self.tokens.shape
        for name in ("labels", "position_ids", "segment_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"packed micro-batch: {name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"tokens {tuple(shape)}")
        if (self.blocks.dtype != torch.int64 or self.blocks.device.type != "cpu"
                or self.blocks.shape != (self.num_pairs, len(BLOCK_COLUMNS))):
            raise ValueError(f"packed micro-batch: blocks must be a CPU int64 tensor of one "
                             f"{BLOCK_COLUMNS} line per pair")
        if self.rewards.shape != (2 * self.num_pairs,):
            raise ValueError(f"packed micro-batch: rewards must have 2 * num_pairs = {2 * self.num_pairs} values")
        if self.ref_logprobs is not None and self.ref_logprobs.shape != (shape[0], shape[1] - 1):
            raise ValueError("packed micro-batch: ref_logprobs must be [rows, tokens - 1]")

    def with_ref_logprobs(self, ref_logprobs: torch.Tensor) -> "PackedMicroBatch":
        return replace(self, ref_logprobs=ref_logprobs)

    def target_segments(self) -> torch.Tensor:
        """``[R, T-1]``: the sequence each predicted token ``tokens[:, 1:]`` counts for, -1 where none.

        A position counts when its label is trained on and it continues the
        sequence of the token before it (a sequence's first token is never
        predicted; nor is the first token of a rejected part after a shared
        prompt, a prompt token).
        """
        seg = self.segment_ids
        counts = (self.labels[:, 1:] > -1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
        return torch.where(counts, seg[:, 1:], -1)


def dense_block_mask(blocks: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """``[rows, 1, length, length]`` boolean mask of ``blocks``, True where attention is NOT allowed.

    The dense equivalent of the per-block attention (megatron's mask
    convention), for checking it. Padding attends to itself only, so no row of
    scores is empty.
    """
    allowed = torch.eye(length, dtype=torch.bool).repeat(rows, 1, 1)
    for row, start, shared, first, second in blocks.tolist():
        head, tail = start + shared + first, start + shared + first + second
        allowed[row, start:head, start:head] = torch.ones(head - start, head - start, dtype=torch.bool).tril()
        allowed[row, head:tail, start:start + shared] = True
        allowed[row, head:tail, head:tail] = torch.ones(second, second, dtype=torch.bool).tril()
    return ~allowed.unsqueeze(1)


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


class ValueSources(NamedTuple):
    """Where the per-token values of one packed row (``[1, T-1]``, aligned with ``tokens[:, 1:]``) come from.

    Value ``[rows[i], cols[i]]`` of the padded batch (``[2B, S-1]``, the
    prediction of token ``cols[i] + 1`` from token ``cols[i]``) is the packed
    value ``[0, packed_cols[i]]``. The first ``owned`` entries have distinct
    packed columns; the others are positions in the rejected responses' shared
    prompts, computed once in their chosen's columns.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    packed_cols: torch.Tensor
    owned: int


@dataclass
class TokenCounts:
    """Token positions computed by forward passes, the padding among them, and shared-prompt tokens not computed."""

    computed: int = 0
    padding: int = 0
    shared_prompt_saved: int = 0

    def add(self, other: "TokenCounts") -> None:
        self.computed += other.computed
        self.padding += other.padding
        self.shared_prompt_saved += other.shared_prompt_saved


@dataclass(frozen=True)
class PackingPlan:
    """Packed micro-batches of a padded global batch, where their values come from, and token counts.

    ``sources[m]``: the ``ValueSources`` of micro-batch ``m`` (micro-batches have one row).
    """

    micro_batches: list[PackedMicroBatch]
    sources: list[ValueSources]
    padded_shape: tuple[int, int]
    counts: TokenCounts

    def pack_token_values(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values aligned with the padded ``tokens[:, 1:]`` -> each micro-batch's ``[1, T-1]``."""
        out = []
        for mb, (rows, cols, packed_cols, owned) in zip(self.micro_batches, self.sources):
            packed = torch.zeros(1, mb.tokens.shape[1] - 1, dtype=values.dtype)
            packed[0, packed_cols[:owned]] = values[rows[:owned], cols[:owned]]
            out.append(packed)
        return out

    def unpack_token_values(self, packed: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``pack_token_values``: ``[2B, S-1]``, 0 where the padded batch has padding.

        A rejected response's shared-prompt positions get the values computed for its chosen.
        """
        rows_total, length = self.padded_shape
        out = torch.zeros(rows_total, length - 1, dtype=packed[0].dtype if packed else torch.float32)
        for values, (rows, cols, packed_cols, _) in zip(packed, self.sources):
            out[rows, cols] = values[0, packed_cols]
        return out


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a boolean ``[N, W]``: the index of its first True, ``W`` where none."""
    padded = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)
    return padded.int().argmax(dim=1)  # argmax returns the first of equal maxima


def shared_prompt_lengths(batch: dict) -> torch.Tensor:
    """``[B]``: how many leading tokens each pair's rejected sequence shares with its chosen one (0: none).

    With ``L`` the least of: the common prefix of chosen and rejected (same ids
    and positions) and the index of each one's first trained label, the shared
    part is ``chosen[:L-1]``. The rejected part then restarts at its token
    ``L-1``, a copy of the chosen's (same id and position, attending to the same
    tokens, so with the same hidden state), and every trained token is still
    predicted from the column before it in its own sequence. ``L <= 1``: nothing
    to share.
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    pairs, width = chosen.shape
    columns = torch.arange(width)[None]
    chosen_length, rejected_length = batch["chosen_length"][:, None], batch["rejected_length"][:, None]
    differs = (chosen != rejected) | (columns >= torch.minimum(chosen_length, rejected_length))
    if "position_ids" in batch:
        differs |= batch["position_ids"] != batch["rejected_position_ids"]
    first_label = [_first_true((batch[f"{side}_labels"] > -1) | (columns >= length))
                   for side, length in (("chosen", chosen_length), ("rejected", rejected_length))]
    limit = torch.minimum(_first_true(differs), torch.minimum(*first_label))
    return torch.where(limit > 1, limit - 1, 0)


def _span(row: int, first_col: int, stop_col: int, first_dst: int) -> tuple[torch.Tensor, ...]:
    """(rows, cols, packed columns) of padded row ``row``'s ``first_col..stop_col-1``, packed from ``first_dst``."""
    count = stop_col - first_col
    return (torch.full((count,), row, dtype=torch.long), torch.arange(first_col, stop_col),
            torch.arange(first_dst, first_dst + count))


def pack_padded_batch(batch: dict, pack_tokens: int, length_multiple: int = 1,
                      common_length: bool = False, shared_prompt: bool = False) -> PackingPlan:
    """Pack a collated (padded) global batch into micro-batches of one row of at most ``pack_tokens`` tokens.

    Whole pairs go first-fit-decreasing by the tokens of their block (chosen plus
    rejected, less the shared prompt with ``shared_prompt``: see
    ``shared_prompt_lengths``). Each row is padded to a multiple of
    ``length_multiple`` (the TP size under sequence parallelism), and with
    ``common_length`` (pipeline parallelism: one activation shape per step) to the
    longest row of the batch. Position ids come from the batch's
    ``position_ids``/``rejected_position_ids`` when present, else count from 0
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
    shared = shared_prompt_lengths(batch).tolist() if shared_prompt else [0] * pairs
    sizes = [lengths[i] + lengths[pairs + i] - shared[i] for i in range(pairs)]
    bins = first_fit_decreasing(sizes, pack_tokens)

    def round_up(n: int) -> int:
        return -(-n // length_multiple) * length_multiple

    row_lengths = [round_up(sum(sizes[i] for i in members)) for members in bins]
    common = max(row_lengths, default=0)
    micro_batches, sources = [], []
    counts = TokenCounts(shared_prompt_saved=sum(shared))
    for members, row_length in zip(bins, row_lengths):
        length = common if common_length else row_length
        count = len(members)
        token_spans, segments, blocks, value_spans, shared_copies = [], [], [], [], []
        start = 0
        # Canonical sequence order: chosen of each member pair (k), then their rejected (count + k).
        for k, pair in enumerate(members):
            chosen_row, rejected_row = pair, pairs + pair
            chosen_length, rejected_length, prompt = lengths[chosen_row], lengths[rejected_row], shared[pair]
            rejected_start = start + chosen_length
            token_spans += [_span(chosen_row, 0, chosen_length, start),
                            _span(rejected_row, prompt, rejected_length, rejected_start)]
            segments += [torch.full((chosen_length,), k), torch.full((rejected_length - prompt,), count + k)]
            # A sequence's last token predicts nothing.
            value_spans += [_span(chosen_row, 0, chosen_length - 1, start),
                            _span(rejected_row, prompt, rejected_length - 1, rejected_start)]
            shared_copies.append(_span(rejected_row, 0, prompt, start))
            blocks.append([0, start, prompt, chosen_length - prompt, rejected_length - prompt])
            start = rejected_start + rejected_length - prompt
        rows, cols, dst = (torch.cat(parts) for parts in zip(*token_spans))

        def place(values: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((1, length), fill, dtype=values.dtype)
            out[0, dst] = values
            return out

        micro_batches.append(PackedMicroBatch(
            tokens=place(tokens[rows, cols], 0),
            labels=place(labels[rows, cols], -100),
            position_ids=place(positions[rows, cols], 0),
            segment_ids=place(torch.cat(segments), -1),
            blocks=torch.tensor(blocks, dtype=torch.int64),
            rewards=rewards[members + [pairs + i for i in members]],
            num_pairs=count,
        ))
        owned = sum(len(span[0]) for span in value_spans)
        sources.append(ValueSources(*(torch.cat(parts) for parts in zip(*value_spans + shared_copies)), owned))
        counts.computed += length
        counts.padding += length - start
    plan = PackingPlan(micro_batches, sources, (2 * pairs, width), counts)
    if "ref_policy_log_probs_chosen" in batch:
        ref = torch.cat([batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"]])
        plan = replace(plan, micro_batches=[mb.with_ref_logprobs(r) for mb, r in
                                            zip(plan.micro_batches, plan.pack_token_values(ref))])
    return plan
