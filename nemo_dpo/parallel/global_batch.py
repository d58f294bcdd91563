"""Global-batch totals from what each pipeline's last stage reported for its micro-batches.

A step's metrics cover the whole global batch: every micro-batch of every
data-parallel rank. Only the last pipeline stage computes losses, and the
tensor-parallel ranks of one stage hold identical copies, so each value must be
counted once per pipeline.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nemo_dpo.parallel.collectives import all_gather_rows, all_reduce


def reduce_global_batch(sums: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sums`` added over the global batch, and ``rows`` (one per pair) gathered from it, on every rank.

    Each rank passes the totals and rows of its own micro-batches; what ranks off
    the last pipeline stage pass is ignored.
    """
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        sums, rows = torch.zeros_like(sums), rows[:0]
    sums = all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        rows = rows[:0]
    return sums, all_gather_rows(rows)
