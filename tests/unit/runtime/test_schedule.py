"""The LR schedule against transformers' own (`get_scheduler`): equal after warm-up, one step ahead during it.

Ours is kept (deepspeed_setup.py `lr_lambda`) for one deliberate difference: transformers' warm-up starts at LR 0, so
the first optimizer step of a run with warm-up changes nothing; ours starts at 1/warmup. A 30-step run with two
warm-up steps (the default recipe) would otherwise spend one of its 30 updates at LR 0.
"""

import math

import pytest
import torch
from transformers import get_scheduler

from grpo.runtime.deepspeed_setup import lr_lambda

pytestmark = pytest.mark.unit


def transformers_factors(name: str, warmup: int, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule,hf_name", [("constant", "constant_with_warmup"), ("cosine", "cosine"),
                                              ("linear", "linear")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_matches_transformers(schedule, hf_name, warmup):
    total = 12
    ours = [lr_lambda(warmup, total, schedule)(s) for s in range(total)]
    theirs = transformers_factors(hf_name, warmup, total)
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    # during warm-up ours is transformers' one step later: (s + 1) / warmup instead of s / warmup
    assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert theirs[:warmup] == pytest.approx([s / warmup for s in range(warmup)])
    if schedule == "cosine":  # by hand: halfway through the decay the factor is 0.5
        half = warmup + (total - warmup) // 2
        assert ours[half] == pytest.approx(0.5 * (1 + math.cos(math.pi * (half - warmup) / (total - warmup))))
