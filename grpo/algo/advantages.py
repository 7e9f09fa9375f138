"""Group-relative advantages: plain functions on a [num_groups, G] reward tensor.

NaN rewards (a reward errored for that sample) are excluded from their group's statistics and get advantage 0;
the loss also masks them out. A group whose valid rewards are all equal carries no signal: advantage 0, never
NaN, and it is counted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6


def _valid_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    return valid, r, n, mean


def grpo(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (std + eps), std being the unbiased sample std of the group (as in DeepSeekMath)."""
    valid, r, n, mean = _valid_stats(rewards)
    var = (((r - mean) ** 2) * valid).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    adv = (r - mean) / (var.sqrt() + EPS)
    return torch.where(valid, adv, torch.zeros_like(adv))


def drgrpo(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean: Dr. GRPO drops the std division, which over-weights near-uniform groups."""
    valid, r, n, mean = _valid_stats(rewards)
    return torch.where(valid, r - mean, torch.zeros_like(r))


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """r_i - mean of the other samples of the group (leave-one-out baseline, unbiased)."""
    valid, r, n, _ = _valid_stats(rewards)
    total = r.sum(dim=1, keepdim=True)
    others = (total - r) / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, r - others, torch.zeros_like(r))
    return torch.where(valid, adv, torch.zeros_like(r))


ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"grpo": grpo, "drgrpo": drgrpo, "rloo": rloo}


def zero_variance_groups(rewards: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Bool [num_groups]: groups whose valid rewards are all equal (or with fewer than two valid samples)."""
    valid = ~torch.isnan(rewards)
    hi = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).amax(dim=1)
    lo = torch.where(valid, rewards, torch.full_like(rewards, torch.inf)).amin(dim=1)
    return (valid.sum(dim=1) < 2) | ((hi - lo) <= tol)
