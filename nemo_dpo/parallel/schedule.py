"""Data-parallel wrapping and one entry point to megatron-core's pipeline schedules."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func


def wrap_data_parallel(model_chunks: list[torch.nn.Module],
                       ddp_config: DistributedDataParallelConfig | None = None) -> list[DistributedDataParallel]:
    """Wrap chunks in megatron-core DDP; ``ddp_config`` must be the optimizer's (see ``OptimizerSettings``).

    Gradients accumulate over micro-batches in ``param.main_grad`` and are
    averaged (or, for the distributed optimizer, reduce-scattered) over the
    data-parallel group by ``finalize_model_grads`` when the schedule finishes;
    embeddings tied across pipeline stages are summed there too. The default:
    fp32 gradient buffers, all-reduced once per step, for a replicated optimizer.
    """
    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Buckets matter only when reduction overlaps the backward pass or has a size cap.
            disable_bucketing=not ddp_config.overlap_grad_reduce and ddp_config.bucket_size is None,
        )
        for chunk in model_chunks
    ]
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    return wrapped


def forward_backward(
    model_chunks: list[torch.nn.Module],
    forward_step_func: Callable,
    data_iterator: Iterator | list[Iterator],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list:
    """Run one global batch through the pipeline schedule for this layout.

    ``seq_length`` is the length every micro-batch is padded to: pipeline stages
    exchange activations of a fixed ``[seq_length, micro_batch_size, hidden]``
    shape. Returns, on the last pipeline stage, what ``forward_step_func``'s loss
    function reported for each micro-batch (an empty list elsewhere).

    With sequence parallelism each TP rank holds ``seq_length / TP`` positions
    (megatron divides the exchanged shape itself), so ``seq_length`` must be a
    multiple of TP; checked here, before any stage waits on another.
    """
    config = model_chunks[0].config
    tp_size = config.tensor_model_parallel_size
    if config.sequence_parallel and seq_length % tp_size:
        raise ValueError(
            f"sequence length {seq_length} is not a multiple of tensor_model_parallel_size={tp_size}, "
            "which sequence parallelism needs: pad batches to a multiple of it (pad_length_to_multiple_of)"
        )
    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
