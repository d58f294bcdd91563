"""Greedy decoding from megatron-core GPT chunks of any TP/PP layout, for small evaluations.

Each new token costs a full forward of every sequence so far (no KV cache):
``O(new_tokens x length^2)`` attention work, fine for the short answers of a
task metric on small models, not for long generations or serving. Every step
runs megatron's forward-only pipeline schedule on one micro-batch, so pipeline
stages exchange activations as in training; the last stage picks each row's
next token (an argmax over the vocabulary, across tensor-parallel shards, ties
to the lowest id, as ``torch.argmax``) and broadcasts it to the other stages.
Memory: the model computes the logits of every position, ``batch_size x length
x vocabulary/TP`` floats per forward; choose ``batch_size`` for that. Sampling,
beam search and stop strings are not supported.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch
from megatron.core import parallel_state

from nemo_dpo.parallel.collectives import all_gather_rows, broadcast
from nemo_dpo.parallel.schedule import forward_backward

__all__ = ["greedy_generate", "vocab_parallel_argmax"]


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The id of the largest logit of each row of this TP rank's vocabulary shard ``[..., V/TP]``, over all shards.

    Ids at or past ``vocab_size`` (the padding of a vocabulary made divisible) are never chosen.
    """
    shard = logits.shape[-1]
    offset = parallel_state.get_tensor_model_parallel_rank() * shard
    logits = logits.float().masked_fill(torch.arange(offset, offset + shard, device=logits.device) >= vocab_size,
                                        -torch.inf)
    local = logits.argmax(-1)
    # Value and global id in one float64 tensor (exact for both), gathered from every shard.
    best = torch.stack([logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).double(), (local + offset).double()])
    group = parallel_state.get_tensor_model_parallel_group()
    shards = all_gather_rows(best.reshape(1, 2, -1), group=group)  # [TP, 2, rows]
    winner = shards[:, 0].argmax(0)  # the first shard holding the maximum: the lowest id
    return shards[:, 1].gather(0, winner.unsqueeze(0)).squeeze(0).long().reshape(local.shape)


def _next_tokens(model_chunks: list, rows: list[list[int]], vocab_size: int, pad_id: int) -> list[int]:
    """One forward of ``rows`` (right-padded; causal attention never sees the padding): each row's next id."""
    config = model_chunks[0].config
    longest = max(map(len, rows))
    if config.sequence_parallel:  # sequence-parallel ranks hold length/TP positions each
        tp = config.tensor_model_parallel_size
        longest = -(-longest // tp) * tp
    tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    last = torch.tensor([len(row) - 1 for row in rows])

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        positions = torch.arange(batch.shape[1]).expand_as(batch)
        output = model(batch.to(device), positions.to(device), None)

        def pick(logits):  # last stage: [rows, length, V/TP]
            at_last = logits[torch.arange(len(rows), device=logits.device), last.to(logits.device)]
            return torch.zeros(()), {"next": vocab_parallel_argmax(at_last, vocab_size).cpu()}

        return output, pick

    data = [iter([tokens]) for _ in model_chunks] if len(model_chunks) > 1 else iter([tokens])
    reports = forward_backward(model_chunks, forward_step, data, num_microbatches=1, seq_length=longest,
                               micro_batch_size=len(rows), forward_only=True)
    chosen = reports[0]["next"] if reports else torch.zeros(len(rows), dtype=torch.long)
    chosen = broadcast(chosen, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return chosen.tolist()


@torch.no_grad()
def greedy_generate(
    model_chunks: list,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    vocab_size: int,
    stop_ids: Collection[int] = (),
    batch_size: int = 64,
    pad_id: int = 0,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), at most ``max_new_tokens`` long.

    A continuation ends after the first id in ``stop_ids`` (included). ``model_chunks``:
    this rank's model chunks (megatron-core ``GPTModel``s, DDP-wrapped or not), put in eval
    mode for the call. Collective over the tensor- and pipeline-parallel groups: their
    ranks must pass the same prompts; data-parallel replicas may pass different ones.
    Prompts run ``batch_size`` at a time; the result is the same on every rank.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    stop_ids = set(stop_ids)
    training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    continuations: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [list(map(int, prompt)) for prompt in prompts[start : start + batch_size]]
            if not all(rows):
                raise ValueError("greedy_generate: a prompt has no tokens")
            new: list[list[int]] = [[] for _ in rows]
            for _ in range(max_new_tokens):
                # Rows still generating; the same on every rank, since every rank appends the same ids.
                active = [i for i, ids in enumerate(new) if not (ids and ids[-1] in stop_ids)]
                if not active:
                    break
                for i, token in zip(active, _next_tokens(model_chunks, [rows[i] + new[i] for i in active],
                                                         vocab_size, pad_id)):
                    new[i].append(token)
            continuations.extend(new)
    finally:
        for chunk, mode in zip(model_chunks, training):
            chunk.train(mode)
    return continuations
