"""NeMo's ``CosineAnnealing`` learning-rate schedule: linear warmup, cosine decay, constant tail."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def cosine_annealing_lr(step: int, max_lr: float, min_lr: float, max_steps: int,
                        warmup_steps: int = 0, constant_steps: int = 0) -> float:
    """Learning rate at optimizer step ``step`` (0-based), with NeMo's semantics.

    Warmup ramps ``max_lr * (step + 1) / (warmup_steps + 1)``; the cosine then
    falls from ``max_lr`` to ``min_lr`` over ``max_steps - warmup_steps -
    constant_steps`` steps; the last ``constant_steps`` and anything past
    ``max_steps`` stay at ``min_lr``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = max_steps - warmup_steps - constant_steps
    if step > max_steps or decay_steps <= 0 or step - warmup_steps >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / decay_steps
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineAnnealing(torch.optim.lr_scheduler.LRScheduler):
    """``model.optim.sched`` with ``name: CosineAnnealing`` (``warmup_steps``, ``constant_steps``, ``min_lr``)."""

    def __init__(self, optimizer, max_steps: int, min_lr: float = 0.0,
                 warmup_steps: int = 0, constant_steps: int = 0, last_epoch: int = -1):
        self.max_steps = max_steps
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.constant_steps = constant_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            cosine_annealing_lr(self.last_epoch, base_lr, self.min_lr, self.max_steps,
                                self.warmup_steps, self.constant_steps)
            for base_lr in self.base_lrs
        ]


def build_scheduler(optimizer, sched_cfg, max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Schedule from ``model.optim.sched``: ``CosineAnnealing``, or a constant rate when absent."""
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    if sched_cfg is None:
        return torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lambda step: 1.0)
    check_schedule_config(sched_cfg, torch_optimizer.param_groups[0]["lr"])
    max_steps = sched_cfg.get("max_steps") or max_steps
    min_lr = sched_cfg.get("min_lr", 0.0)
    warmup_steps, constant_steps = sched_cfg.get("warmup_steps", 0), sched_cfg.get("constant_steps", 0)
    if warmup_steps + constant_steps > max_steps:
        # Short trial runs of a long schedule are common; they just never reach the peak.
        log.warning(
            "model.optim.sched: warmup_steps (%d) + constant_steps (%d) exceed the run's %d steps: the "
            "learning rate never reaches model.optim.lr", warmup_steps, constant_steps, max_steps,
        )
    return CosineAnnealing(torch_optimizer, max_steps=max_steps, min_lr=min_lr,
                           warmup_steps=warmup_steps, constant_steps=constant_steps)


def check_schedule_config(sched_cfg, lr: float) -> None:
    """Raise, naming the key, for a schedule ``model.optim.sched`` that cannot work with peak rate ``lr``."""
    if sched_cfg is None:
        return
    name = sched_cfg.get("name")
    if name != "CosineAnnealing":
        raise ValueError(f"model.optim.sched.name={name!r} is not supported; valid: ['CosineAnnealing']")
    min_lr = sched_cfg.get("min_lr", 0.0)
    warmup_steps, constant_steps = sched_cfg.get("warmup_steps", 0), sched_cfg.get("constant_steps", 0)
    if not (isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and 0 <= min_lr <= lr):
        raise ValueError(f"model.optim.sched.min_lr={min_lr!r} must be a finite number in [0, model.optim.lr={lr}]")
    for key, value in (("warmup_steps", warmup_steps), ("constant_steps", constant_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"model.optim.sched.{key}={value!r} must be an integer >= 0")
