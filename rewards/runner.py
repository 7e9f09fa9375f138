"""Scoring a batch of completions with several weighted rewards, keeping errors apart from zeros.

With a `WorkerPool` every (reward, completion) call runs in a killable worker process with the reward's own time
limit, so a hang or a crash costs that one sample; without one (unit tests, tiny runs) each reward is called once
on the whole batch in-process. Either way an exception or a timeout is recorded (counted, logged, NaN in the
records) and never becomes a silent 0. A sample with an errored reward gets a NaN total, which the advantage step
excludes from its group's statistics and from the loss.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards import TRAINER_COLUMNS, RewardFn, get_reward, required_columns
from rewards.pool import WorkerPool


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout: float = 10.0  # seconds per completion, when scored in worker processes


def build_rewards(specs: Sequence[Any]) -> list[Reward]:
    """From recipe specs (objects with name, weight, args) to bound reward functions. Raises ValueError naming
    the reward on an unknown name or a bad argument."""
    out = []
    for i, s in enumerate(specs):
        try:
            fn = get_reward(s.name)
        except KeyError as e:
            raise ValueError(f"rewards[{i}].name: {e.args[0]}") from None
        if s.args:
            fn = functools.update_wrapper(functools.partial(fn, **s.args), fn)
        try:  # a dry call on an empty batch catches unknown or bad arguments now, not mid-run
            fn([], **{c: [] for c in required_columns(fn)})
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"rewards[{i}] ({s.name}): {type(e).__name__}: {e}") from None
        out.append(Reward(s.name, fn, float(s.weight), float(getattr(s, "timeout", 10.0))))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: a reward is listed twice ({names})")
    return out


def check_columns(rewards: list[Reward], columns: Sequence[str]) -> None:
    """Fail before training when the data set lacks a column a reward needs."""
    for r in rewards:
        missing = [c for c in required_columns(r.fn) if c not in columns and c not in TRAINER_COLUMNS]
        if missing:
            raise ValueError(f"reward {r.name!r} needs column(s) {missing}, but the data set has "
                             f"{sorted(columns)}")


@dataclass
class Scores:
    per_reward: dict[str, list[float]]  # NaN where not applicable or errored
    total: list[float]  # weighted sum over applicable rewards; NaN where any reward errored or timed out
    errors: dict[str, int] = field(default_factory=dict)  # errors and timeouts
    timeouts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)


def _call_one(fn: RewardFn, completion: str, row: dict[str, Any]) -> Any:
    """One completion through a batch-signature reward (runs in a worker)."""
    vals = fn([completion], **{k: [v] for k, v in row.items()})
    if len(vals) != 1:
        raise ValueError(f"returned {len(vals)} scores for 1 completion")
    return vals[0]


def score(rewards: list[Reward], completions: list[str], columns: dict[str, list[Any]],
          pool: WorkerPool | None = None) -> Scores:
    """Score every completion with every reward. `columns[k][i]` is row field k for completion i."""
    n = len(completions)
    per: dict[str, list[float]] = {}
    bad = [False] * n
    errors: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    messages: list[str] = []
    for r in rewards:
        t0 = time.perf_counter()
        vals = [math.nan] * n
        errors[r.name] = timeouts[r.name] = 0
        if pool is None:
            try:
                got = r.fn(completions, **columns)
                if len(got) != n:
                    raise ValueError(f"returned {len(got)} scores for {n} completions")
                vals = [_as_float(v) for v in got]
            except Exception as e:  # noqa: BLE001 - a reward's bug costs its samples, never the run
                bad = [True] * n
                errors[r.name] = n
                messages.append(f"{r.name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        else:
            calls = [((r.fn, completions[i], {k: v[i] for k, v in columns.items()}), {}) for i in range(n)]
            for i, o in enumerate(pool.map(_call_one, calls, r.timeout)):
                try:
                    if o.error is not None:
                        raise RuntimeError(o.error)
                    vals[i] = _as_float(o.value)
                except Exception as e:  # noqa: BLE001
                    bad[i] = True
                    errors[r.name] += 1
                    timeouts[r.name] += int(o.timed_out)
                    if len(messages) < 5:
                        messages.append(f"{r.name} on completion {i}: {e}")
        seconds[r.name] = time.perf_counter() - t0
        per[r.name] = vals
    total = []
    for i in range(n):
        if bad[i]:
            total.append(math.nan)
            continue
        total.append(sum(r.weight * per[r.name][i] for r in rewards if not math.isnan(per[r.name][i])))
    return Scores(per, total, errors, timeouts, seconds, messages)


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    f = float(v)
    if math.isinf(f) or math.isnan(f):
        raise ValueError(f"non-finite score {v!r}")
    return f
