"""Functions run on every rank of a spawned gloo group by the layout tests."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.init import iter_sharded_tensors
from nemo_dpo.optim.optimizer import MegatronAdamW
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel
from nemo_dpo.parallel.logprobs import vocab_parallel_logprobs
from nemo_dpo.parallel.schedule import forward_backward, wrap_data_parallel


def rank_coordinates() -> dict:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_rank(),
        pp=parallel_state.get_pipeline_model_parallel_rank(),
        dp=parallel_state.get_data_parallel_rank(),
        last_stage=parallel_state.is_pipeline_last_stage(),
    )


def weight_shards(model_chunks) -> list:
    """(key, global shape, global offset, prepended axes, values) of every tensor this rank holds."""
    shards = []
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        for sharded in iter_sharded_tensors(module.sharded_state_dict()):
            if sharded.data is None or sharded.key.endswith("_extra_state"):
                continue
            shards.append(
                (sharded.key, tuple(sharded.global_shape), tuple(sharded.global_offset),
                 sharded.prepend_axis_num, sharded.data.detach().clone())
            )
    return shards


def token_logprob_step(vocab_size: int):
    """forward_step_func: next-token log-probs; loss = mean negative log-prob."""

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        output = model(inputs, positions, None)

        def loss_func(logits):
            logprobs = vocab_parallel_logprobs(logits, targets, vocab_size)
            full_logits = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]
            return -logprobs.mean(), {"logits": full_logits.detach(), "logprobs": logprobs.detach()}

        return output, loss_func

    return forward_step


def forward_and_train_step(tp: int, pp: int, model_cfg: dict, vocab_size: int,
                           tokens: torch.Tensor, micro_batch_size: int, lr: float,
                           vpp: int | None = None) -> dict:
    """Forward a global batch, then take one AdamW step; report outputs and the weights before and after."""
    initialize_parallel(ParallelLayout(tp, pp, vpp), seed=0)
    cfg = OmegaConf.create(model_cfg)
    chunks = wrap_data_parallel(build_gpt_model(cfg, vocab_size))
    dp_size = parallel_state.get_data_parallel_world_size()
    local = tokens.chunk(dp_size)[parallel_state.get_data_parallel_rank()]
    micro_batches = list(local.split(micro_batch_size))
    step = token_logprob_step(vocab_size)

    def run(forward_only: bool):
        # Interleaved schedules take one iterator per model chunk.
        data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
        return forward_backward(
            chunks, step, data, len(micro_batches),
            seq_length=tokens.shape[1] - 1, micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    with torch.no_grad():
        outputs = run(forward_only=True)
    initial_shards = weight_shards(chunks)
    # Adam's first update is ~lr * sign(g) wherever |g| >> eps, which hides the
    # gradient's magnitude and amplifies round-off where |g| ~ eps; a large eps
    # keeps the update proportional to the gradient so the test compares both.
    optimizer = MegatronAdamW(chunks, OptimizerSettings(lr=lr, weight_decay=0.1, eps=1e-3))
    for chunk in chunks:
        chunk.zero_grad_buffer()
    run(forward_only=False)
    _, grad_norm, _ = optimizer.step(clip_grad=1.0)
    return dict(rank_coordinates(), outputs=outputs, grad_norm=grad_norm, shards=weight_shards(chunks),
                initial_shards=initial_shards)
