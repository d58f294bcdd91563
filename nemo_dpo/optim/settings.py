"""``model.optim`` (and the model's precision) as one validated object, mapped onto megatron-core.

NeMo configs name the optimizer (``adamw``, ``fused_adam``,
``distributed_fused_adam``) and set data-parallel gradient keys next to it
(``bucket_cap_mb``, ``overlap_grad_sync``, ``contiguous_grad_buffer``,
``grad_sync_dtype``). :class:`OptimizerSettings` reads every one of them once,
refuses what cannot work (naming the key), and produces the two megatron configs
that must agree: :class:`DistributedDataParallelConfig` (gradient buffers and
their reduction) and :class:`OptimizerConfig` (master weights, Adam, sharding).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

log = logging.getLogger(__name__)

# NeMo configs name their Adam variants; all are AdamW (decoupled weight decay) here.
ADAM_NAMES = ("adamw", "adam", "fused_adam", "distributed_fused_adam")
# The name that asks for optimizer state sharded over data parallelism (ZeRO-1).
SHARDED_NAME = "distributed_fused_adam"
_GRAD_SYNC_DTYPES = {"fp32": True, "float32": True, 32: True, "bf16": False, "bfloat16": False}
_BYTES_PER_MB = 1024 * 1024


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with megatron-core: hyper-parameters, precision, sharding and gradient reduction.

    ``use_distributed_optimizer`` shards fp32 master weights and Adam moments
    over the data-parallel ranks (gradients reduce-scattered, parameters
    all-gathered). ``grad_reduce_in_fp32``: gradients accumulate and are reduced
    in fp32 whatever the parameter dtype. ``bucket_elements``: gradient elements
    per reduction bucket (``None``: one bucket per model chunk).
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    params_dtype: torch.dtype = torch.float32
    use_distributed_optimizer: bool = False
    grad_reduce_in_fp32: bool = True
    overlap_grad_reduce: bool = False
    bucket_elements: int | None = None

    @classmethod
    def from_config(cls, optim_cfg, params_dtype: torch.dtype = torch.float32) -> "OptimizerSettings":
        """Settings from ``model.optim`` for parameters of ``params_dtype`` (``model.precision``'s dtype).

        An impossible value raises naming its key.
        """
        optim_cfg = optim_cfg or {}
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
        _check_fixed_keys(optim_cfg)
        _require(params_dtype is not torch.float16,
                 "model.precision: fp16 (with a loss scaler) is not supported; use bf16 or 32")
        return cls(
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, params_dtype=params_dtype,
            use_distributed_optimizer=_sharded(optim_cfg, name),
            grad_reduce_in_fp32=_grad_reduce_in_fp32(optim_cfg.get("grad_sync_dtype")),
            overlap_grad_reduce=_flag(optim_cfg, "overlap_grad_sync", False),
            bucket_elements=_bucket_elements(optim_cfg.get("bucket_cap_mb")),
        )

    @property
    def mixed_precision(self) -> bool:
        return self.params_dtype is not torch.float32

    def ddp_config(self) -> DistributedDataParallelConfig:
        """How megatron DDP buffers and reduces gradients for these settings."""
        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.grad_reduce_in_fp32,
            overlap_grad_reduce=self.overlap_grad_reduce,
            use_distributed_optimizer=self.use_distributed_optimizer,
            bucket_size=self.bucket_elements,
        )

    def megatron_config(self) -> OptimizerConfig:
        """megatron's optimizer config; clipping is applied per step by the caller (0 here)."""
        return OptimizerConfig(
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.weight_decay,
            adam_beta1=self.betas[0],
            adam_beta2=self.betas[1],
            adam_eps=self.eps,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype is torch.bfloat16,
            use_distributed_optimizer=self.use_distributed_optimizer,
            clip_grad=0.0,
        )


def _sharded(optim_cfg, name: str) -> bool:
    explicit = optim_cfg.get("use_distributed_optimizer")
    if explicit is None:
        return name == SHARDED_NAME
    _require(isinstance(explicit, bool), f"model.optim.use_distributed_optimizer={explicit!r} must be true, false or null")
    return explicit


def _grad_reduce_in_fp32(grad_sync_dtype) -> bool:
    if grad_sync_dtype is None:
        return True
    _require(grad_sync_dtype in _GRAD_SYNC_DTYPES,
             f"model.optim.grad_sync_dtype={grad_sync_dtype!r} is not supported; valid: null, fp32, bf16")
    return _GRAD_SYNC_DTYPES[grad_sync_dtype]


def _bucket_elements(bucket_cap_mb) -> int | None:
    if bucket_cap_mb is None:
        return None
    _require(_is_number(bucket_cap_mb) and bucket_cap_mb > 0,
             f"model.optim.bucket_cap_mb={bucket_cap_mb!r} must be a number > 0 or null")
    # Gradient buffers hold fp32 elements.
    return max(int(bucket_cap_mb * _BYTES_PER_MB) // 4, 1)


def _flag(optim_cfg, key: str, default: bool) -> bool:
    value = optim_cfg.get(key, default)
    _require(isinstance(value, bool), f"model.optim.{key}={value!r} must be true or false")
    return value


def _check_fixed_keys(optim_cfg) -> None:
    """NeMo keys with one possible value here: the other value is refused with the reason."""
    _require(_flag(optim_cfg, "contiguous_grad_buffer", True),
             "model.optim.contiguous_grad_buffer=False is not supported: megatron-core's DDP always keeps "
             "gradients in one contiguous buffer")
    _require(not _flag(optim_cfg, "overlap_param_sync", False),
             "model.optim.overlap_param_sync=True is not supported: updated parameters are all-gathered "
             "right after the optimizer step")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
