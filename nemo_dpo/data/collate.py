"""Batching of DPO items into padded tensors (NeMo Aligner's ``dpo_custom_collate``).

Like NeMo Aligner, this runs outside the DataLoader (which uses an identity collate):
with ``pad_length_to_multiple_of`` it takes part in a collective, and DataLoader
workers have no process group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nemo_dpo.parallel.collectives import ReduceOp, all_reduce

__all__ = ["document_position_ids", "dpo_custom_collate"]


def document_position_ids(tokens: torch.Tensor, eos_id: int, reset_position_ids: bool = False) -> torch.Tensor:
    """Position ids ``[B, S]``: ``0..S-1``, or with ``reset_position_ids`` restarting at 0 after every eos."""
    batch, length = tokens.shape
    arange = torch.arange(length, device=tokens.device)
    position_ids = arange.expand(batch, length).clone()
    if reset_position_ids:
        after_eos = torch.zeros_like(tokens, dtype=torch.bool)
        after_eos[:, 1:] = tokens[:, :-1] == eos_id
        document_start = torch.where(after_eos, arange, 0).cummax(dim=1).values
        position_ids -= document_start
    return position_ids


def _agreed_length(length: int, group) -> int:
    """The longest ``length`` over ``group``'s ranks (just ``length`` without torch.distributed)."""
    return int(all_reduce(torch.tensor(length, dtype=torch.long), ReduceOp.MAX, group).item())


def dpo_custom_collate(
    batch: list[dict],
    eos_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    pad_length_to_multiple_of: int | None = None,
    pad_to_length: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Stack DPO items into ``[B, S]`` tensors, padding tokens with eos and labels with -100.

    Returns ``chosen``, ``rejected``, ``chosen_length``, ``rejected_length``,
    ``chosen_labels``, ``rejected_labels``, ``position_ids`` (of the chosen rows) and
    ``rejected_position_ids``, ``chosen_rewards``, ``rejected_rewards``, ``sample_mask``
    (1.0 for real pairs, 0.0 for sampler padding, see :mod:`nemo_dpo.data.samplers`) and
    ``sample_index`` (the dataset index of each pair; -1 when the item does not say).
    No attention mask is built: every row is one causal sequence, which the model's
    attention applies without a ``[B, 1, S, S]`` tensor, so ``reset_attention_mask``
    (documents separated by eos inside a row) is refused.

    ``S`` is the longest sequence in the batch, unless:

    * ``pad_to_length`` fixes it (every micro-batch of a run then has one shape);
    * ``pad_length_to_multiple_of`` rounds it up to a multiple (e.g. the TP size for
      sequence parallelism). The length is first agreed with a MAX all-reduce over
      ``group`` (the default group when None) whenever torch.distributed is initialised,
      because pipeline schedules send activations of a fixed, pre-agreed shape between
      stages and DP ranks must not disagree on it; every rank of ``group`` must call this.

    ``eod_mask_loss`` sets the labels of eos tokens to -100 (NeMo Aligner accepts the flag
    but ignores it in DPO).
    """
    if reset_attention_mask:
        raise ValueError(
            "model.data.reset_attention_mask=True is not supported: each DPO sequence is one "
            "prompt and response, attended causally as a whole"
        )
    if pad_length_to_multiple_of is not None and pad_length_to_multiple_of < 0:
        raise ValueError(f"pad_length_to_multiple_of must be >= 0, got {pad_length_to_multiple_of}")
    tokens = [item[key] for key in ("chosen", "rejected") for item in batch]
    labels = [item[f"{key}_labels"] for key in ("chosen", "rejected") for item in batch]
    length = max(len(t) for t in tokens)
    if pad_to_length is not None:
        if length > pad_to_length:
            raise ValueError(f"a sequence of {length} tokens does not fit pad_to_length={pad_to_length}")
        if pad_length_to_multiple_of and pad_to_length % pad_length_to_multiple_of:
            raise ValueError(f"pad_to_length={pad_to_length} is not a multiple of {pad_length_to_multiple_of}")
        length = pad_to_length
    elif pad_length_to_multiple_of:
        length = _agreed_length(length, group)
        length = math.ceil(length / pad_length_to_multiple_of) * pad_length_to_multiple_of

    def stack(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for row, seq in zip(out, seqs):
            row[: len(seq)] = torch.as_tensor(seq)
        return out

    tokens, labels = stack(tokens, eos_id), stack(labels, -100)
    if eod_mask_loss:
        labels[tokens == eos_id] = -100
    chosen, rejected = tokens.chunk(2)
    chosen_labels, rejected_labels = labels.chunk(2)
    chosen_positions, rejected_positions = document_position_ids(tokens, eos_id, reset_position_ids).chunk(2)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "chosen_length": torch.tensor([item["chosen_length"] for item in batch], dtype=torch.long),
        "rejected_length": torch.tensor([item["rejected_length"] for item in batch], dtype=torch.long),
        "chosen_labels": chosen_labels,
        "rejected_labels": rejected_labels,
        "position_ids": chosen_positions,
        "rejected_position_ids": rejected_positions,
        "chosen_rewards": torch.tensor([item["chosen_reward"] for item in batch], dtype=torch.float),
        "rejected_rewards": torch.tensor([item["rejected_reward"] for item in batch], dtype=torch.float),
        "sample_mask": torch.tensor([item.get("sample_mask", 1.0) for item in batch], dtype=torch.float),
        "sample_index": torch.tensor([item.get("sample_index", -1) for item in batch], dtype=torch.long),
    }
