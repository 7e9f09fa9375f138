"""Scoring a batch of completions with several weighted rewards, keeping errors apart from zeros.

An exception raised by a reward function costs the samples of that call an error (counted, logged, NaN in
the records) and never becomes a silent 0. A sample with an errored reward gets a NaN total, which the
advantage step excludes from its group's statistics and from the loss.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards import RewardFn, get_reward, required_columns


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


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
        out.append(Reward(s.name, fn, float(s.weight)))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: a reward is listed twice ({names})")
    return out


def check_columns(rewards: list[Reward], columns: Sequence[str]) -> None:
    """Fail before training when the data set lacks a column a reward needs."""
    for r in rewards:
        missing = [c for c in required_columns(r.fn) if c not in columns]
        if missing:
            raise ValueError(f"reward {r.name!r} needs column(s) {missing}, but the data set has "
                             f"{sorted(columns)}")


@dataclass
class Scores:
    per_reward: dict[str, list[float]]  # NaN where not applicable or errored
    total: list[float]  # weighted sum over applicable rewards; NaN where any reward errored
    errors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)


def score(rewards: list[Reward], completions: list[str], columns: dict[str, list[Any]]) -> Scores:
    """Score every completion with every reward. `columns[k][i]` is row field k for completion i."""
    n = len(completions)
    per: dict[str, list[float]] = {}
    errored = [False] * n
    errors: dict[str, int] = {}
    seconds: dict[str, float] = {}
    messages: list[str] = []
    for r in rewards:
        t0 = time.perf_counter()
        try:
            vals = r.fn(completions, **columns)
            if len(vals) != n:
                raise ValueError(f"returned {len(vals)} scores for {n} completions")
            vals = [_as_float(v) for v in vals]
            errors[r.name] = 0
        except Exception as e:  # noqa: BLE001 - a reward's bug costs its samples, never the run
            vals = [math.nan] * n
            errored = [True] * n
            errors[r.name] = n
            messages.append(f"{r.name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        seconds[r.name] = time.perf_counter() - t0
        per[r.name] = vals
    total = []
    for i in range(n):
        if errored[i]:
            total.append(math.nan)
            continue
        total.append(sum(r.weight * per[r.name][i] for r in rewards if not math.isnan(per[r.name][i])))
    return Scores(per, total, errors, seconds, messages)


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    f = float(v)
    if math.isinf(f) or math.isnan(f):
        raise ValueError(f"non-finite score {v!r}")
    return f
