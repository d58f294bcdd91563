"""AdamW over megatron DDP gradient buffers, with gradient clipping aware of TP and PP.

megatron-core's own optimizer assumes CUDA tensors (its clipping compares
``grad.type()`` with the CUDA tensor type names), so this is a torch optimizer that
reads the fp32 ``main_grad`` buffers DDP reduces into and computes the global
gradient norm over the model-parallel group, counting every parameter once.
Every data-parallel rank keeps the full optimizer state (nothing is sharded).
It keeps megatron's step contract: ``step()`` returns
``(update_successful, grad_norm, num_zeros_in_grad)``.
"""

from __future__ import annotations

import logging
import math

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from nemo_dpo.parallel.collectives import all_reduce

log = logging.getLogger(__name__)


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Biases and norm gains are not decayed (megatron and NeMo do the same).
    return param.ndim == 1 or name.endswith(".bias")


class ReplicatedAdamW:
    """``torch.optim.AdamW`` for a list of DDP-wrapped megatron chunks (fp32 parameters).

    The Adam moments of every parameter live on every data-parallel rank
    (replicated, not sharded as in megatron's distributed optimizer).
    """

    def __init__(
        self,
        model_chunks,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        decay, no_decay = [], []
        for chunk in model_chunks:
            for name, param in chunk.named_parameters():
                if not param.requires_grad:
                    continue
                if param.dtype != torch.float32:
                    raise ValueError(
                        f"ReplicatedAdamW keeps no fp32 master copy; parameter {name} is "
                        f"{param.dtype}. Train in fp32 (model.precision=32)."
                    )
                (no_decay if _no_weight_decay(name, param) else decay).append(param)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=tuple(betas),
            eps=eps,
        )

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, clip_grad: float = 0.0) -> tuple[bool, float, None]:
        """Clip to global norm ``clip_grad`` (0: no clipping), then update.

        A non-finite gradient norm skips the update and reports ``False``.
        """
        for param in self.params:
            param.grad = param.main_grad
        grad_norm = global_grad_norm(self.params)
        if not math.isfinite(grad_norm):
            self.zero_grad()
            return False, grad_norm, None
        if clip_grad > 0 and grad_norm > clip_grad:
            scale = clip_grad / (grad_norm + 1e-6)
            for param in self.params:
                param.grad.mul_(scale)
        self.optimizer.step()
        self.zero_grad()
        return True, grad_norm, None

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Adam moments as sharded tensors keyed like their parameters, so they reshard.

        ``model_sharded_state_dict`` must come from the same model chunks. For
        loading, empty moments are created first so there is something to load into.
        """
        if is_loading:
            self._create_empty_state()
        state_dict = self.optimizer.state_dict()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        steps = {float(state["step"]) for state in state_dict["state"].values()}
        if len(steps) > 1:
            raise RuntimeError(f"parameters disagree on the optimizer step: {sorted(steps)}")
        optim_state_to_sharding_state(
            state_dict, get_param_id_to_sharded_param_map(model_sharded_state_dict, params), exclude_keys=("step",)
        )
        # One step for all: per-parameter steps would not survive resharding.
        state_dict["common_step"] = steps.pop() if steps else 0.0
        return state_dict

    def load_sharded_state_dict(self, state_dict: dict) -> None:
        """Load what ``sharded_state_dict(..., is_loading=True)`` was filled with."""
        step = state_dict.pop("common_step")
        for param_state in state_dict["state"].values():
            param_state["step"] = torch.tensor(step)
        self.optimizer.load_state_dict(state_dict)

    def _create_empty_state(self) -> None:
        for param in self.params:
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def global_grad_norm(params) -> float:
    """L2 norm of the whole model's gradient, identical on every rank.

    Each rank sums squares of the gradients it owns; parameters replicated across
    tensor-parallel ranks and the pipeline's copy of tied embeddings are counted
    once, then the sum is reduced over the model-parallel (TP x PP) group. The
    gradients are already averaged over data parallelism.
    """
    local = torch.zeros((), dtype=torch.float32)
    for param in params:
        if param.grad is None:
            continue
        if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
            local += param.grad.detach().float().pow(2).sum().to(local.device)
    if parallel_state.model_parallel_is_initialized():
        local = all_reduce(local, group=parallel_state.get_model_parallel_group())
    return local.sqrt().item()


# NeMo configs name their Adam variants; all are AdamW (decoupled weight decay) here.
ADAM_NAMES = ("adamw", "adam", "fused_adam", "distributed_fused_adam")
# Names that ask for optimizer state sharded over data parallelism, which ReplicatedAdamW does not do.
SHARDED_NAMES = ("distributed_fused_adam",)


def build_optimizer(model_chunks, optim_cfg) -> ReplicatedAdamW:
    """Optimizer from ``model.optim`` (``name``, ``lr``, ``weight_decay``, ``betas``, ``eps``)."""
    settings = check_optimizer_config(optim_cfg)
    if optim_cfg.get("name", "adamw") in SHARDED_NAMES:
        log.warning(
            "model.optim.name=%s: the optimizer state is not sharded yet; every data-parallel rank "
            "keeps all of it (AdamW, same updates)", optim_cfg.name,
        )
    return ReplicatedAdamW(model_chunks, **settings)


def check_optimizer_config(optim_cfg) -> dict:
    """``model.optim``'s AdamW settings, each checked; an impossible value raises naming its key."""
    name = optim_cfg.get("name", "adamw")
    if name not in ADAM_NAMES:
        raise ValueError(f"model.optim.name={name!r} is not supported; valid: {list(ADAM_NAMES)}")
    lr, weight_decay = optim_cfg.get("lr"), optim_cfg.get("weight_decay", 0.0)
    betas, eps = tuple(optim_cfg.get("betas", (0.9, 0.999))), optim_cfg.get("eps", 1e-8)
    _require(_is_number(lr) and lr > 0, f"model.optim.lr={lr!r} must be a finite number > 0")
    _require(_is_number(weight_decay) and weight_decay >= 0,
             f"model.optim.weight_decay={weight_decay!r} must be a finite number >= 0")
    _require(len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
             f"model.optim.betas={list(betas)!r} must be two numbers in [0, 1)")
    _require(_is_number(eps) and eps > 0, f"model.optim.eps={eps!r} must be a finite number > 0")
    return dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
