"""Greedy generation from the trained policy, and the task metric of the embedded default demo."""

from nemo_dpo.generation.greedy import greedy_generate, vocab_parallel_argmax

__all__ = ["greedy_generate", "vocab_parallel_argmax"]
