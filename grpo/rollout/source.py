"""The rollout source: what the loop reads each step, `ro = source.next(step, timer)`, whatever the engine.

One place cuts a rank's prompts (`take_rows`) and builds the sampling parameters (`sampling_params`), for every
engine. Two implementations behind the one call:

- `SyncSource`: generate, score and compute advantages now (with dynamic sampling, more rounds until every rank has
  its groups with signal);
- `AsyncSource` (`rollout.async`, server mode): this step's groups were generated while the previous step updated,
  and the next step's generation starts before this one's update. Groups sampled on weights more than
  `rollout.max_staleness` versions old are dropped and counted.

A checkpoint saves `source.sampler_state()`: with a generation in flight, the sampler from before it took its
prompts, so a resumed run takes them again and regenerates them.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from grpo.algo.advantages import zero_variance_groups
from grpo.config import Config
from grpo.data import PromptSampler, PromptSet
from grpo.rollout.base import Completion, RolloutEngine, SamplingParams
from grpo.rollout.scoring import Group, Rollouts, scored
from grpo.runtime import collectives as coll
from rewards.pool import WorkerPool
from rewards.runner import Reward, TrainerState


def sampling_params(cfg: Config) -> SamplingParams:
    """The recipe's sampling for training rollouts (evaluation builds its own, greedy or k samples)."""
    r = cfg.rollout
    return SamplingParams(r.max_new_tokens, r.temperature, r.top_p)


def take_rows(cfg: Config, prompts: PromptSet, sampler: PromptSampler, rank: int, prompts_per_rank: int
              ) -> list[dict[str, Any]]:
    """The next step's prompts (every rank takes the whole step's, so the samplers stay aligned); this rank's share."""
    idx = sampler.take(cfg.rollout.prompts_per_step)
    return [prompts.rows[i] for i in idx[rank * prompts_per_rank : (rank + 1) * prompts_per_rank]]


class SyncSource:
    """Rollouts generated when the step asks for them."""

    def __init__(self, cfg: Config, engine: RolloutEngine, prompts: PromptSet, rewards: list[Reward],
                 pool: WorkerPool | None, sampler: PromptSampler, rank: int, prompts_per_rank: int):
        self.cfg, self.engine, self.prompts, self.rewards, self.pool = cfg, engine, prompts, rewards, pool
        self.sampler, self.rank, self.per_rank = sampler, rank, prompts_per_rank

    def sampler_state(self) -> dict[str, Any]:
        """What a checkpoint saves of the data order."""
        return self.sampler.state()

    def _trainer_state(self, step: int) -> TrainerState:
        s = self.sampler
        return TrainerState(step, self.cfg.steps, s.epoch + s.pos / max(s.size, 1))

    def _score(self, rows: list[dict[str, Any]], comps: list[list[Completion]], state: TrainerState
               ) -> tuple[list[Group], dict[str, int], dict[str, int]]:
        return scored(self.cfg, rows, comps, self.rewards, self.prompts, self.pool, state)

    def next(self, step: int, timer) -> Rollouts:
        """Rollouts for one step on this rank. With dynamic sampling, zero-variance groups are dropped and more prompts
        sampled (all ranks take the same number of rounds, so the sampler stays aligned)."""
        r = self.cfg.rollout
        errors = {x.name: 0 for x in self.rewards}
        timeouts = dict(errors)
        kept: list[Group] = []
        spare: list[Group] = []
        rounds = 0
        while True:
            mine = take_rows(self.cfg, self.prompts, self.sampler, self.rank, self.per_rank)
            with timer("generate"):
                comps = self.engine.generate([row["prompt_ids"] for row in mine], r.num_generations,
                                             sampling_params(self.cfg))
            with timer("score"):
                groups, errs, outs = self._score(mine, comps, self._trainer_state(step))
            for k in errors:
                errors[k] += errs[k]
                timeouts[k] += outs[k]
            rounds += 1
            if not r.dynamic_sampling:
                return Rollouts(groups, rounds, errors, timeouts)
            flat = zero_variance_groups(torch.tensor([g.total for g in groups])).tolist()
            kept += [g for g, z in zip(groups, flat, strict=True) if not z]
            spare += [g for g, z in zip(groups, flat, strict=True) if z]
            if not coll.any_rank(len(kept) < self.per_rank) or rounds >= r.max_sampling_rounds:
                break
        # top up with no-signal groups only if the rounds ran out
        return Rollouts((kept + spare)[: self.per_rank], rounds, errors, timeouts)


class Prefetch:
    """One step's generation in a background thread. The prompts are taken in the main thread, so the data order does
    not depend on timing; `sampler_state` is the sampler before they were taken."""

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


def stale_groups(groups: list[Group], version: int, max_staleness: int) -> list[bool]:
    """Per group: sampled (any completion) more than `max_staleness` weight versions behind `version`."""
    return [any(c.version is not None and version - c.version > max_staleness for c in g.completions)
            for g in groups]


class AsyncSource(SyncSource):
    """Rollouts generated one step ahead, during the previous step's update (rollout.async)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: Prefetch | None = None

    def sampler_state(self) -> dict[str, Any]:
        return self.pending.sampler_state if self.pending is not None else self.sampler.state()

    def _prefetch(self) -> Prefetch:
        state = self.sampler.state()
        rows = take_rows(self.cfg, self.prompts, self.sampler, self.rank, self.per_rank)
        return Prefetch(self.engine, rows, self.cfg.rollout.num_generations, sampling_params(self.cfg), state)

    def next(self, step: int, timer) -> Rollouts:
        """This step's rollouts from the generation started during the previous update (or now, on the first step and
        after a resume), and the next step's generation started; stale groups are dropped and counted."""
        pending = self.pending if self.pending is not None else self._prefetch()
        with timer("wait_rollout"):
            comps = pending.wait()
        state = self._trainer_state(step)  # as in sync mode: before the next step's prompts are taken
        self.pending = self._prefetch() if step < self.cfg.steps else None
        with timer("score"):
            groups, errors, timeouts = self._score(pending.rows, comps, state)
        # (a rank that drops groups trains on fewer: every rank still runs grad_accum micro-steps, see update.py)
        stale = stale_groups(groups, self.engine.version, self.cfg.rollout.max_staleness)  # server mode: versions
        kept = [g for g, s in zip(groups, stale, strict=True) if not s]
        return Rollouts(kept, 1, errors, timeouts, sum(stale))


def rollout_source(cfg: Config, engine: RolloutEngine, prompts: PromptSet, rewards: list[Reward],
                   pool: WorkerPool | None, sampler: PromptSampler, rank: int, prompts_per_rank: int,
                   asynchronous: bool | None = None) -> SyncSource:
    """The recipe's source (`rollout.async`), or the one asked for (`grpo doctor` always samples synchronously)."""
    cls = AsyncSource if (cfg.rollout.async_ if asynchronous is None else asynchronous) else SyncSource
    return cls(cfg, engine, prompts, rewards, pool, sampler, rank, prompts_per_rank)
