"""Greedy generation with the embedded default model at a given TP/PP, run on the test pool's workers."""

from __future__ import annotations


def default_model_greedy(tp: int, pp: int, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                         sequence_parallel: bool = False, batch_size: int = 64) -> list[list[int]]:
    """``greedy_generate`` of the embedded default model in a (tp, pp) layout, as every rank sees it."""
    from omegaconf import OmegaConf

    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.generation import greedy_generate
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(tp, pp), seed=0)
    source = open_pretrained(DEFAULT_MODEL_DIR)
    cfg = OmegaConf.create({**source.architecture, "sequence_parallel": sequence_parallel})
    chunks = build_gpt_model(cfg, source.vocab_size, seed=0)
    source.load_weights(chunks)
    return greedy_generate(chunks, prompts, max_new_tokens, source.vocab_size, stop_ids, batch_size=batch_size)


def sharded_argmax(full_logits, vocab_size: int) -> list[int]:
    """``vocab_parallel_argmax`` at TP = world size, each rank holding its vocabulary shard of ``full_logits``."""
    import torch.distributed as dist

    from nemo_dpo.generation import vocab_parallel_argmax
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    tp = dist.get_world_size()
    initialize_parallel(ParallelLayout(tp, 1), seed=0)
    shard = full_logits.shape[-1] // tp
    rank = dist.get_rank()
    return vocab_parallel_argmax(full_logits[..., rank * shard:(rank + 1) * shard], vocab_size).tolist()


def default_task_exact_match(num_prompts: int) -> float:
    """``TaskExactMatch`` of the embedded default model on the first validation prompts, in one process."""
    from omegaconf import OmegaConf

    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.data import DPOModelDataset
    from nemo_dpo.generation.task_metric import TaskExactMatch
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel
    from nemo_dpo.training.data import DEFAULT_DATA_DIR

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    source = open_pretrained(DEFAULT_MODEL_DIR)
    chunks = build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size, seed=0)
    source.load_weights(chunks)
    tokenizer = source.load_tokenizer()
    dataset = DPOModelDataset(None, tokenizer, "validation", DEFAULT_DATA_DIR / "validation.jsonl", None, None,
                              source.architecture["encoder_seq_length"], 0)
    return TaskExactMatch(dataset, tokenizer, source.vocab_size, 8, num_prompts).measure(chunks)
