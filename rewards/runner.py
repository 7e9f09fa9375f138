"""Scoring a batch of completions with several weighted rewards, keeping errors apart from zeros.

Rewards are called by keyword as TRL calls them (`prompts=`, `completions=`, `completion_ids=`, `trainer_state=`,
and the row's columns). With a `WorkerPool` every (reward, completion) call runs in a killable worker process with
the reward's own time limit, so a hang or a crash costs that one sample; without one (unit tests, tiny runs) each
reward is called once on the whole batch in-process. Either way an exception, a timeout, a wrong number of scores
or a score that is not a number is recorded (counted, logged, NaN in the records) and never becomes a silent 0. A
sample with an errored reward gets a NaN total, which the advantage step excludes from its group's statistics and
from the loss.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards import TRAINER_COLUMNS, BoundReward
from rewards.pool import Outcome, WorkerPool


@dataclass
class Reward:
    name: str
    fn: BoundReward
    weight: float = 1.0
    timeout: float = 10.0  # seconds per completion, when scored in worker processes


def build_rewards(specs: Sequence[Any]) -> list[Reward]:
    """From recipe specs (objects with name, weight, args and optionally init, timeout) to bound rewards. Raises
    ValueError naming the reward on an unknown name, a factory that does not build, or a bad argument."""
    out = []
    for i, s in enumerate(specs):
        try:
            fn = BoundReward(s.name, getattr(s, "init", None), s.args)
        except KeyError as e:
            key = "args" if "unknown argument" in str(e.args[0]) else "name"
            raise ValueError(f"rewards[{i}].{key}: {e.args[0]}") from None
        except (TypeError, ValueError) as e:  # an init that is not JSON, a callable without a signature
            raise ValueError(f"rewards[{i}] ({s.name}): {type(e).__name__}: {e}") from None
        try:  # a dry call on an empty batch catches unknown or bad arguments now, not mid-run
            fn(prompts=[], completions=[], completion_ids=[], trainer_state=TrainerState(),
               **{c: [] for c in (*fn.columns, *TRAINER_COLUMNS)})
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
        missing = [c for c in r.fn.columns if c not in columns and c not in TRAINER_COLUMNS]
        if missing:
            raise ValueError(f"reward {r.name!r} needs column(s) {missing}, but the data set has "
                             f"{sorted(columns)}")


@dataclass
class TrainerState:
    """What TRL's `trainer_state` offers a reward for shaping by training progress (a picklable subset)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class Scores:
    per_reward: dict[str, list[float]]  # NaN where not applicable or errored
    total: list[float]  # weighted sum over applicable rewards; NaN where any reward errored or timed out
    errors: dict[str, int] = field(default_factory=dict)  # errors and timeouts
    timeouts: dict[str, int] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)


def _call_slice(fn: BoundReward, completions: list[Any], rows: dict[str, list[Any]],
                state: TrainerState) -> list[Any]:
    """Some completions through a reward, by keyword as TRL calls it (runs in a worker)."""
    vals = fn(completions=completions, trainer_state=state, **rows)
    if len(vals) != len(completions):
        raise ValueError(f"returned {len(vals)} scores for {len(completions)} completion(s)")
    return vals


def score(rewards: list[Reward], completions: list[Any], columns: dict[str, list[Any]],
          pool: WorkerPool | None = None, trainer_state: TrainerState | None = None,
          group_size: int | None = None) -> Scores:
    """Score every completion with every reward. `columns[k][i]` is row field k for completion i (`prompts` and
    `completion_ids` included). A reward marked `batched` (its score depends on the other completions, as
    `len_reward` does) sees one group of `group_size` completions per call; the others see one completion per call
    in the workers."""
    n = len(completions)
    state = trainer_state or TrainerState()
    per: dict[str, list[float]] = {}
    bad = [False] * n
    errors: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    messages: list[str] = []
    for r in rewards:
        vals = [math.nan] * n
        errors[r.name] = timeouts[r.name] = 0
        if pool is None or r.fn.batched:
            size = (group_size or n) if r.fn.batched else n
            slices = [slice(a, min(a + size, n)) for a in range(0, n, max(size, 1))]
        else:
            slices = [slice(i, i + 1) for i in range(n)]
        calls = [((r.fn, completions[sl], {k: v[sl] for k, v in columns.items()}, state), {}) for sl in slices]
        if pool is None:
            outcomes = []
            for args, _ in calls:
                try:
                    outcomes.append(Outcome(value=_call_slice(*args)))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # noqa: BLE001 - a reward's bug (or math-verify's timeout, a
                    # BaseException) costs its samples, never the run
                    outcomes.append(Outcome(error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        else:
            outcomes = pool.map(_call_slice, calls, r.timeout * max(sl.stop - sl.start for sl in slices))
        for sl, o in zip(slices, outcomes, strict=True):
            try:
                if o.error is not None:
                    raise RuntimeError(o.error)
                got = [_as_float(v) for v in o.value]
            except Exception as e:  # noqa: BLE001
                for i in range(sl.start, sl.stop):
                    bad[i] = True
                errors[r.name] += sl.stop - sl.start
                timeouts[r.name] += (sl.stop - sl.start) * int(o.timed_out)
                if len(messages) < 5:
                    messages.append(f"{r.name} on completion(s) {sl.start}..{sl.stop - 1}: {e}")
                continue
            vals[sl] = got
        per[r.name] = vals
    total = []
    for i in range(n):
        if bad[i]:
            total.append(math.nan)
            continue
        total.append(sum(r.weight * per[r.name][i] for r in rewards if not math.isnan(per[r.name][i])))
    return Scores(per, total, errors, timeouts, messages)


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
        raise TypeError(f"a score must be a number or None, got {type(v).__name__} {v!r:.60}")
    f = float(v)
    if math.isinf(f) or math.isnan(f):
        raise ValueError(f"non-finite score {v!r}")
    return f
