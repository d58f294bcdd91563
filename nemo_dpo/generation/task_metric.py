"""A task metric from preference pairs: does the policy's greedy answer equal the chosen response's?

The answer is the first line: the tokens up to the first one whose text holds a
newline, or eos. For the embedded default task (2-digit sums, the correct sum
chosen) that is the sum itself, so the metric is the exact-match accuracy of the
model's arithmetic on held-out questions. Texts are compared decoded and
stripped, so two tokenisations of the same answer agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core import parallel_state

from nemo_dpo.generation.greedy import greedy_generate
from nemo_dpo.parallel.collectives import all_reduce

__all__ = ["TaskExactMatch", "answer_ids", "exact_match", "line_end_ids", "prompt_and_reference"]

# Bytes of fp32 logits one generation batch may hold: every position's logits exist at once
# (megatron's GPTModel computes them all), so rows per batch shrink with length and vocabulary.
LOGITS_BUDGET_BYTES = 256 * 2**20


def line_end_ids(tokenizer) -> set[int]:
    """The ids that end an answer: eos and every token whose text holds a newline."""
    ends = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.ids_to_text([i])}
    return ends | {tokenizer.eos_id}


def answer_ids(ids: Sequence[int], ends: set[int]) -> list[int]:
    """``ids`` up to (not including) the first of ``ends``."""
    answer = []
    for token in ids:
        if token in ends:
            break
        answer.append(int(token))
    return answer


def exact_match(generated: Sequence[int], reference: Sequence[int], tokenizer, ends: set[int]) -> bool:
    """Whether the answers (first lines) of two id sequences read the same, ends stripped of whitespace."""
    def text(ids):
        return tokenizer.ids_to_text(answer_ids(ids, ends)).strip()

    return text(generated) == text(reference)


def prompt_and_reference(item: dict) -> tuple[list[int], list[int]]:
    """The prompt ids and chosen-response ids of a ``DPOModelDataset`` item."""
    labels, length = item["chosen_labels"], int(item["chosen_length"])
    prompt_length = int((labels[:length] == -100).sum())
    ids = item["chosen"][:length].tolist()
    return ids[:prompt_length], ids[prompt_length:]


class TaskExactMatch:
    """Exact-match accuracy of greedy answers to the prompts of preference pairs, against their chosen responses.

    ``dataset``: items in ``DPOModelDataset``'s layout; the first ``num_prompts`` are
    used (all when None). ``max_new_tokens`` bounds each answer.
    """

    def __init__(self, dataset, tokenizer, vocab_size: int, max_new_tokens: int = 8, num_prompts: int | None = None):
        count = len(dataset) if num_prompts is None else min(num_prompts, len(dataset))
        self.pairs = [prompt_and_reference(dataset[i]) for i in range(count)]
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.ends = line_end_ids(tokenizer)

    def __len__(self) -> int:
        return len(self.pairs)

    def measure(self, model_chunks: list) -> float:
        """The accuracy of the model now, the same on every rank. Collective: every rank calls it.

        Data-parallel replicas answer an equal share of the prompts each.
        """
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        share = self.pairs[dp_rank::dp_size]
        longest = max((len(prompt) for prompt, _ in share), default=1) + self.max_new_tokens
        shard = -(-self.vocab_size // parallel_state.get_tensor_model_parallel_world_size())
        batch_size = max(1, LOGITS_BUDGET_BYTES // (4 * longest * shard))
        answers = greedy_generate(model_chunks, [prompt for prompt, _ in share], self.max_new_tokens,
                                  self.vocab_size, self.ends, batch_size=batch_size) if share else []
        correct = sum(exact_match(answer, reference, self.tokenizer, self.ends)
                      for answer, (_, reference) in zip(answers, share))
        total = all_reduce(torch.tensor(float(correct), dtype=torch.float64),
                           group=parallel_state.get_data_parallel_group())
        return total.item() / len(self.pairs)
