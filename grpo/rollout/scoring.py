"""Scoring: every completion of a group through the recipe's rewards, then group-relative advantages.

Scoring and advantages are separate steps: evaluation scores without advantages. What a training step samples and
scores is the rollout source's (grpo/rollout/source.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.algo.advantages import ADVANTAGES
from grpo.data import PromptSet
from grpo.rollout.base import Completion
from rewards.pool import WorkerPool
from rewards.runner import Reward, TrainerState, score

log = logging.getLogger("grpo")


@dataclass
class Group:
    row: dict[str, Any]
    completions: list[Completion]
    rewards: dict[str, list[float]]  # per reward function (NaN: not applicable / errored)
    total: list[float]  # NaN: a reward errored for that sample
    advantages: list[float] = field(default_factory=list)  # filled by `with_advantages`


@dataclass
class Rollouts:
    """What the rollout source produced for one step on this rank."""

    groups: list[Group]
    rounds: int  # sampling rounds (more than one only with dynamic sampling)
    errors: dict[str, int]  # per reward: samples that errored or timed out, over all rounds
    timeouts: dict[str, int]
    stale: int = 0  # async: groups dropped for sampling weights older than rollout.max_staleness allows


def score_groups(rows: list[dict[str, Any]], comps: list[list[Completion]], rewards: list[Reward],
                 prompts: PromptSet, pool: WorkerPool | None = None,
                 state: TrainerState | None = None) -> tuple[list[Group], dict[str, int], dict[str, int]]:
    """Score every completion with TRL's calling convention (prompts, completions as text or as assistant messages
    for a conversational data set, completion ids, the row's columns). Returns the groups (no advantages yet) and
    the per-reward error and timeout counts."""
    flat = [c for g in comps for c in g]
    G = len(comps[0]) if comps else 0
    pairs = [(row, c) for row, g in zip(rows, comps, strict=True) for c in g]
    cols = {k: [row[k] for row, _ in pairs] for k in prompts.columns}
    cols["prompts"] = [row["prompt_messages"] if prompts.conversational else row["prompt"] for row, _ in pairs]
    cols["completion_ids"] = [c.ids for c in flat]
    cols["num_tokens"] = [len(c.ids) for c in flat]
    cols["finish_reason"] = [c.finish_reason for c in flat]
    texts = [c.text for c in flat]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if prompts.conversational else texts
    s = score(rewards, completions, cols, pool, state, group_size=G)
    for m in s.error_messages:
        log.warning("reward error: %s", m)
    groups = [Group(row, g, {k: v[i * G : (i + 1) * G] for k, v in s.per_reward.items()}, s.total[i * G : (i + 1) * G])
              for i, (row, g) in enumerate(zip(rows, comps, strict=True))]
    return groups, s.errors, s.timeouts


def with_advantages(groups: list[Group], method: str) -> list[Group]:
    """Fill each group's advantages from its totals (grpo / drgrpo / rloo, see grpo/algo/advantages.py)."""
    if groups:
        adv = ADVANTAGES[method](torch.tensor([g.total for g in groups], dtype=torch.float64))
        for g, a in zip(groups, adv.tolist(), strict=True):
            g.advantages = a
    return groups


def scored(cfg, rows, comps, rewards, prompts, pool, state) -> tuple[list[Group], dict[str, int], dict[str, int]]:
    """score_groups, then the recipe's advantages."""
    groups, errors, timeouts = score_groups(rows, comps, rewards, prompts, pool, state)
    return with_advantages(groups, cfg.algo.advantage), errors, timeouts
