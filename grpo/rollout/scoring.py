"""Rollouts for one step: sample G completions per prompt, score them, then group-relative advantages.

Scoring and advantages are separate steps: evaluation scores without advantages. Each phase returns what it
produced (groups, rounds, error counts).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.algo.advantages import ADVANTAGES, zero_variance_groups
from grpo.data import PromptSampler, PromptSet
from grpo.rollout.base import Completion, RolloutEngine, SamplingParams
from grpo.runtime import collectives as coll
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


def sampling_params(cfg) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(r.max_new_tokens, r.temperature, r.top_p)


def take_rows(cfg, prompts: PromptSet, sampler: PromptSampler, rank: int, prompts_per_rank: int
              ) -> list[dict[str, Any]]:
    """The next step's prompts (every rank takes the whole step's, so the samplers stay aligned); this rank's share."""
    idx = sampler.take(cfg.rollout.prompts_per_step)
    return [prompts.rows[i] for i in idx[rank * prompts_per_rank : (rank + 1) * prompts_per_rank]]


def scored(cfg, rows, comps, rewards, prompts, pool, state) -> tuple[list[Group], dict[str, int], dict[str, int]]:
    """score_groups, then the recipe's advantages."""
    groups, errors, timeouts = score_groups(rows, comps, rewards, prompts, pool, state)
    return with_advantages(groups, cfg.algo.advantage), errors, timeouts


def collect(cfg, engine: RolloutEngine, prompts: PromptSet, rewards: list[Reward], pool: WorkerPool | None,
            sampler: PromptSampler, rank: int, prompts_per_rank: int, step: int, timer) -> Rollouts:
    """Rollouts for one step on this rank. With dynamic sampling, zero-variance groups are dropped and more prompts
    sampled (all ranks take the same number of rounds, so the sampler stays aligned)."""
    r = cfg.rollout
    errors = {x.name: 0 for x in rewards}
    timeouts = dict(errors)
    kept: list[Group] = []
    spare: list[Group] = []
    rounds = 0
    while True:
        mine = take_rows(cfg, prompts, sampler, rank, prompts_per_rank)
        with timer("generate"):
            comps = engine.generate([row["prompt_ids"] for row in mine], r.num_generations, sampling_params(cfg))
        with timer("score"):
            state = TrainerState(step, cfg.steps, sampler.epoch + sampler.pos / max(sampler.size, 1))
            groups, errs, outs = scored(cfg, mine, comps, rewards, prompts, pool, state)
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


# ---------------------------------------------------------------------------------------------- async rollouts

class Prefetch:
    """One step's generation in a background thread (rollout.async, server mode): the servers sample the next
    step's groups while the trainer updates on this one's. The prompts are taken in the main thread, so the data
    order does not depend on timing; `sampler_state` is the sampler before they were taken, which a checkpoint
    written while this is in flight saves (a resumed run takes the same prompts again and regenerates them)."""

    def __init__(self, engine: RolloutEngine, rows: list[dict[str, Any]], n: int, params: SamplingParams,
                 sampler_state: dict[str, Any]):
        self.rows, self.sampler_state = rows, sampler_state
        self.comps: list[list[Completion]] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(engine, n, params), daemon=True)
        self.thread.start()

    def _run(self, engine: RolloutEngine, n: int, params: SamplingParams) -> None:
        try:
            self.comps = engine.generate([row["prompt_ids"] for row in self.rows], n, params)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by wait()
            self.error = e

    def wait(self) -> list[list[Completion]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.comps


def start_prefetch(cfg, engine: RolloutEngine, prompts: PromptSet, sampler: PromptSampler, rank: int,
                   prompts_per_rank: int) -> Prefetch:
    state = sampler.state()
    rows = take_rows(cfg, prompts, sampler, rank, prompts_per_rank)
    return Prefetch(engine, rows, cfg.rollout.num_generations, sampling_params(cfg), state)


def stale_groups(groups: list[Group], version: int, max_staleness: int) -> list[bool]:
    """Per group: sampled (any completion) more than `max_staleness` weight versions behind `version`."""
    return [any(c.version is not None and version - c.version > max_staleness for c in g.completions)
            for g in groups]


def collect_async(cfg, engine: RolloutEngine, prompts: PromptSet, rewards: list[Reward], pool: WorkerPool | None,
                  sampler: PromptSampler, rank: int, prompts_per_rank: int, step: int, timer,
                  pending: Prefetch | None) -> tuple[Rollouts, Prefetch | None]:
    """This step's rollouts from the generation started during the previous update (or now, on the first step and
    after a resume), and the next step's generation started; stale groups are dropped and counted."""
    if pending is None:
        pending = start_prefetch(cfg, engine, prompts, sampler, rank, prompts_per_rank)
    with timer("wait_rollout"):
        comps = pending.wait()
    state = TrainerState(step, cfg.steps, sampler.epoch + sampler.pos / max(sampler.size, 1))  # as in sync mode
    nxt = start_prefetch(cfg, engine, prompts, sampler, rank, prompts_per_rank) if step < cfg.steps else None
    with timer("score"):
        groups, errors, timeouts = scored(cfg, pending.rows, comps, rewards, prompts, pool, state)
    # (a rank that drops groups trains on fewer: every rank still runs grad_accum micro-steps, see grpo/loop/update.py)
    stale = stale_groups(groups, engine.version, cfg.rollout.max_staleness)  # (server mode: it has versions)
    kept = [g for g, s in zip(groups, stale, strict=True) if not s]
    return Rollouts(kept, 1, errors, timeouts, sum(stale)), nxt
