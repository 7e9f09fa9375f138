import math

import pytest
import torch

from grpo.algo.advantages import ADVANTAGES, drgrpo, grpo, rloo, zero_variance_groups

pytestmark = pytest.mark.unit

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)


def test_grpo_by_hand():
    a = grpo(R)
    s = math.sqrt(1 / 3)  # unbiased std of [1,0,0,1]
    assert a[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: zero, never NaN
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert a[2].tolist() == pytest.approx([-0.75 / std3] * 3 + [2.25 / std3], rel=1e-5)


def test_drgrpo_by_hand():
    assert drgrpo(R)[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert drgrpo(R)[2].tolist() == [-0.75, -0.75, -0.75, 2.25]


def test_rloo_by_hand():
    a = rloo(R)
    assert a[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert a[2].tolist() == pytest.approx([-1.0, -1.0, -1.0, 3.0])
    assert a[1].tolist() == [0.0] * 4


def test_rloo_matches_loop():
    r = torch.rand(5, 6, dtype=torch.float64)
    a = rloo(r)
    for g in range(5):
        for i in range(6):
            others = [r[g, j].item() for j in range(6) if j != i]
            assert a[g, i].item() == pytest.approx(r[g, i].item() - sum(others) / 5)


@pytest.mark.parametrize("name", list(ADVANTAGES))
def test_errored_samples_are_excluded(name):
    r = torch.tensor([[1.0, math.nan, 0.0]], dtype=torch.float64)
    a = ADVANTAGES[name](r)
    assert not torch.isnan(a).any()
    assert a[0, 1].item() == 0.0
    if name == "grpo":
        assert a[0].tolist() == pytest.approx([0.5 / math.sqrt(0.5), 0.0, -0.5 / math.sqrt(0.5)], rel=1e-5)
    if name == "rloo":
        assert a[0].tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_zero_variance_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [math.nan, 1.0], [math.nan, math.nan]])
    assert zero_variance_groups(r).tolist() == [True, False, True, True]
