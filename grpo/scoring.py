"""Rollouts for one step: sample G completions per prompt, score them, then group-relative advantages.

Scoring and advantages are separate steps: evaluation scores without advantages. Each phase returns what it
produced (groups, rounds, error counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo import collectives as coll
from grpo.advantages import ADVANTAGES, zero_variance_groups
from grpo.data import PromptSampler, PromptSet
from grpo.rollout import Completion, RolloutEngine, SamplingParams
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
    """What `collect` produced for one step on this rank."""

    groups: list[Group]
    rounds: int  # sampling rounds (more than one only with dynamic sampling)
    errors: dict[str, int]  # per reward: samples that errored or timed out, over all rounds
    timeouts: dict[str, int]


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
    """Fill each group's advantages from its totals (grpo / drgrpo / rloo, see grpo/advantages.py)."""
    if groups:
        adv = ADVANTAGES[method](torch.tensor([g.total for g in groups], dtype=torch.float64))
        for g, a in zip(groups, adv.tolist(), strict=True):
            g.advantages = a
    return groups


def collect(cfg, engine: RolloutEngine, prompts: PromptSet, rewards: list[Reward], pool: WorkerPool | None,
            sampler: PromptSampler, rank: int, prompts_per_rank: int, step: int, timer) -> Rollouts:
    """Rollouts for one step on this rank. With dynamic sampling, zero-variance groups are dropped and more prompts
    sampled (all ranks take the same number of rounds, so the sampler stays aligned)."""
    r = cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    errors = {x.name: 0 for x in rewards}
    timeouts = dict(errors)
    kept: list[Group] = []
    spare: list[Group] = []
    rounds = 0
    while True:
        idx = sampler.take(r.prompts_per_step)
        mine = [prompts.rows[i] for i in idx[rank * prompts_per_rank : (rank + 1) * prompts_per_rank]]
        with timer("generate"):
            comps = engine.generate([row["prompt_ids"] for row in mine], r.num_generations, params)
        with timer("score"):
            state = TrainerState(step, cfg.steps, sampler.epoch + sampler.pos / max(sampler.size, 1))
            groups, errs, outs = score_groups(mine, comps, rewards, prompts, pool, state)
            with_advantages(groups, cfg.algo.advantage)
        for k in errors:
            errors[k] += errs[k]
            timeouts[k] += outs[k]
        rounds += 1
        if not r.dynamic_sampling:
            return Rollouts(groups, rounds, errors, timeouts)
        flat = zero_variance_groups(torch.tensor([g.total for g in groups])).tolist()
        kept += [g for g, z in zip(groups, flat, strict=True) if not z]
        spare += [g for g, z in zip(groups, flat, strict=True) if z]
        if not coll.any_rank(len(kept) < prompts_per_rank) or rounds >= r.max_sampling_rounds:
            break
    # top up with no-signal groups only if the rounds ran out
    return Rollouts((kept + spare)[:prompts_per_rank], rounds, errors, timeouts)
