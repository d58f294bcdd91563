"""A plain ``torch.optim`` optimizer stepped over megatron-DDP model chunks, as NeMo Aligner scripts pass one.

megatron's DDP accumulates gradients in ``param.main_grad``; a torch optimizer
reads ``param.grad``. :func:`step_torch_optimizer` hands it those gradients,
measures their global norm over tensor and pipeline parallelism (each TP
replica and each tied parameter counted once, as megatron's own optimizer
does), clips to ``clip_grad`` and steps, with :class:`MegatronAdamW`'s contract
``(update_successful, grad_norm, None)``.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared


@torch.no_grad()
def step_torch_optimizer(optimizer: torch.optim.Optimizer, clip_grad: float = 0.0) -> tuple[bool, float, None]:
    """Clip the gradients of ``optimizer``'s parameters to global norm ``clip_grad`` (0: no clipping), then step.

    A non-finite norm skips the update on every rank (the norm is the same on all)
    and returns ``False``.
    """
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for param in params:
        main_grad = getattr(param, "main_grad", None)
        if main_grad is not None:
            param.grad = main_grad if main_grad.dtype == param.dtype else main_grad.to(param.dtype)
    with_grads = [param for param in params if param.grad is not None]
    grads_for_norm = [param.grad for param in with_grads
                      if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)]
    grad_norm = float(get_grad_norm_fp32(
        grads_for_norm, grad_stats_parallel_group=parallel_state.get_model_parallel_group()))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad()
        return False, grad_norm, None
    coefficient = clip_grad / (grad_norm + 1e-6)
    if clip_grad > 0 and coefficient < 1.0:
        for param in with_grads:
            param.grad.mul_(coefficient)
    optimizer.step()
    return True, grad_norm, None
