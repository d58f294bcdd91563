"""Smoke run: build the tiny default GPT at the launched layout and take a few training steps.

    python examples/smoke_gpt.py
    torchrun --nproc-per-node 2 examples/smoke_gpt.py --tp 2
"""

import argparse

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.optim.optimizer import DistributedAdamW
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel
from nemo_dpo.parallel.logprobs import vocab_parallel_logprobs
from nemo_dpo.parallel.schedule import forward_backward, wrap_data_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    initialize_parallel(ParallelLayout(args.tp, args.pp), seed=1234)
    vocab, seq, micro = 256, 32, 2
    cfg = OmegaConf.create(dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        encoder_seq_length=seq, normalization="rmsnorm", activation="swiglu",
        position_embedding_type="rope", bias=False, share_embeddings_and_output_weights=False,
    ))
    chunks = wrap_data_parallel(build_gpt_model(cfg, vocab))
    optimizer = DistributedAdamW(chunks, lr=3e-3)
    # A learnable stream: each token is the previous one plus one.
    gen = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        output = model(inputs, torch.arange(seq).expand_as(inputs), None)

        def loss_func(logits):
            loss = -vocab_parallel_logprobs(logits, targets, vocab).mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    for step in range(args.steps):
        starts = torch.randint(0, vocab, (2 * micro, 1), generator=gen)
        tokens = (starts + torch.arange(seq + 1)) % vocab
        for chunk in chunks:
            chunk.zero_grad_buffer()
        reports = forward_backward(chunks, forward_step, iter(tokens.split(micro)), 2, seq, micro, False)
        _, grad_norm, _ = optimizer.step(clip_grad=1.0)
        if reports and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            loss = torch.stack([r["loss"] for r in reports]).mean().item()
            print(f"step {step}: loss {loss:.4f} grad_norm {grad_norm:.4f}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
