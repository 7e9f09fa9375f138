"""Rule-based rewards. Importable without torch.

A reward is a plain function called as TRL's GRPOTrainer calls it, by keyword:
`fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]`,
where `columns` are the data set row's other fields (`answer`, `solution`, ...) plus the trainer's `num_tokens` and
`finish_reason`. `completions` are strings, or for a conversational data set lists of messages
(`[{"role": "assistant", "content": ...}]`), as in TRL; the built-in rewards take both. `None` means "not applicable
to this sample". Rewards are chosen by name in a recipe; `package.module:function` or `package.module.function`
names a user's own (a TRL or open-r1 reward works as published), and `init:` builds one with a factory
(`trl.rewards.get_soft_overlong_punishment`, open-r1's `get_*_reward`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from rewards import code as _code
from rewards import format as _format
from rewards import math as _math
from rewards import shaping as _shaping

RewardFn = Callable[..., list]

REGISTRY: dict[str, RewardFn] = {
    "accuracy": _math.accuracy,
    "think_answer_format": _format.think_answer,
    "number_only_format": _format.number_only,
    "code_format": _format.code_format,
    "tag_count": _shaping.tag_count,
    "reasoning_steps": _shaping.reasoning_steps,
    "soft_overlong": _shaping.soft_overlong,
    "cosine_length": _shaping.cosine_length,
    "len_reward": _shaping.len_reward,
    "repetition_penalty": _shaping.repetition_penalty,
    "countdown": _shaping.countdown,
    "reasoning_gym": _shaping.reasoning_gym_verifier,
    "code_tests": _code.code_tests,
}

# Keywords the trainer passes to every reward (TRL's names), and per-sample columns it adds to every row; none of
# them is a data set column a reward can be missing.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                 "environments")
TRAINER_COLUMNS = ("num_tokens", "finish_reason")


def _import(name: str) -> Any:
    if ":" in name:
        mod, _, attr = name.partition(":")
    elif "." in name:
        mod, _, attr = name.rpartition(".")
    else:
        raise KeyError(f"unknown reward {name!r} (known: {', '.join(sorted(REGISTRY))}, or module:function)")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward {name!r}: cannot import ({type(e).__name__}: {e})") from None


def get_reward(name: str) -> RewardFn:
    """Look a reward up by registry name or `package.module:function` / `package.module.function`; raise KeyError
    naming it if unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    fn = _import(name)
    if not callable(fn):
        raise KeyError(f"reward {name!r}: not callable")
    return fn


@functools.lru_cache(maxsize=64)
def _resolve(name: str, init_json: str) -> tuple[RewardFn, frozenset[str] | None]:
    """The reward function (built by its factory when `init` is given) and the keywords it accepts; once per
    process, since a reward travels to the workers by name with every call."""
    fn = get_reward(name)
    init = json.loads(init_json)
    if init:
        try:
            fn = fn(**init)
        except TypeError as e:
            raise KeyError(f"reward {name!r}: init {init} does not build a reward ({e})") from None
        if not callable(fn):
            raise KeyError(f"reward {name!r}: calling it with init {init} returned {type(fn).__name__}, not a reward")
    return fn, accepted_keywords(fn)


def accepted_keywords(fn: RewardFn) -> frozenset[str] | None:
    """The keywords `fn` accepts, or None when it takes **kwargs (then it gets every keyword, as in TRL)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class BoundReward:
    """A reward by name, factory arguments (`init`) and call arguments (`args`), callable by keyword.

    It is what travels to the scoring workers: a name and plain values pickle, where a factory's closure (open-r1's
    `get_*_reward`) would not; each worker resolves it once. Keywords the function does not accept are not passed,
    so `def f(completions, answer)` works beside TRL's `**kwargs` style."""

    def __init__(self, name: str, init: dict[str, Any] | None = None, args: dict[str, Any] | None = None,
                 _init_json: str | None = None):
        self.name, self.init, self.args = name, dict(init or {}), dict(args or {})
        self._init_json = _init_json or json.dumps(self.init, sort_keys=True)
        fn = self.fn  # resolve now: an unknown name or a bad factory fails at start-up
        if _init_json is None:  # at start-up (not when a worker unpickles it): a misspelt option is an error
            params = inspect.signature(fn).parameters.values()
            named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            unknown = sorted(set(self.args) - named - set(CALL_KEYWORDS))
            if unknown:
                raise KeyError(f"reward {name!r}: unknown argument(s) {unknown} (it takes: "
                               f"{', '.join(sorted(named - set(CALL_KEYWORDS))) or 'none'})")
        self.batched = bool(getattr(fn, "batched", False))
        self._columns: tuple[str, ...] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """Data set columns the reward needs (its `args` supply the rest)."""
        if self._columns is None:
            self._columns = required_columns(self.fn, skip=self.args)
        return self._columns

    @property
    def fn(self) -> RewardFn:
        return _resolve(self.name, self._init_json)[0]

    def __call__(self, **kwargs: Any) -> list:
        fn, accepted = _resolve(self.name, self._init_json)
        kw = {**kwargs, **self.args}
        if accepted is not None:
            kw = {k: v for k, v in kw.items() if k in accepted}
        return list(fn(**kw))

    def __reduce__(self):
        return (BoundReward, (self.name, self.init, self.args, self._init_json))


def required_columns(fn: RewardFn, skip: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Data set columns a reward needs: its `columns` attribute, else its required keyword parameters that are not
    the trainer's own keywords."""
    declared = getattr(fn, "columns", None)
    if declared is not None:
        return tuple(declared)
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params
                 if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.name not in CALL_KEYWORDS and p.name not in (skip or {}))
