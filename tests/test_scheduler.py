"""NeMo's CosineAnnealing learning rate, against values worked out by hand."""

import math

import pytest
import torch

from nemo_dpo.optim.scheduler import CosineAnnealing, cosine_annealing_lr


def cosine(max_lr, min_lr, progress):
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_and_constant_tail():
    # max_steps 10 = 2 warmup + 5 cosine + 3 constant.
    lrs = [cosine_annealing_lr(step, 1.0, 0.1, 10, warmup_steps=2, constant_steps=3) for step in range(12)]
    expected = [
        1 / 3, 2 / 3,                                      # max_lr * (step + 1) / (warmup + 1)
        1.0, 0.914058, 0.689058, 0.410942, 0.185942,       # 0.1 + 0.45 * (1 + cos(pi * k / 5))
        0.1, 0.1, 0.1, 0.1,                                 # constant tail up to max_steps
        0.1,                                                # past max_steps
    ]
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_no_warmup_decays_from_max_to_min_exactly_at_max_steps():
    lrs = [cosine_annealing_lr(step, 2.0, 0.0, 4) for step in range(6)]
    assert lrs == pytest.approx([2.0, 1 + math.sqrt(0.5), 1.0, 1 - math.sqrt(0.5), 0.0, 0.0], abs=1e-12)


def test_far_past_max_steps_stays_at_min_lr():
    assert cosine_annealing_lr(1000, 1.0, 0.05, 10, warmup_steps=2) == 0.05


def test_warmup_longer_than_the_run_then_min_lr():
    lrs = [cosine_annealing_lr(step, 1.0, 0.2, 2, warmup_steps=3) for step in range(5)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 0.2, 0.2])


def test_scheduler_steps_follow_the_function():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = CosineAnnealing(optimizer, max_steps=10, min_lr=0.1, warmup_steps=2, constant_steps=3)
    seen = []
    for _ in range(11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([cosine_annealing_lr(s, 1.0, 0.1, 10, 2, 3) for s in range(11)], abs=1e-12)
    assert seen[3] == pytest.approx(cosine(1.0, 0.1, 0.2))
