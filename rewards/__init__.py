"""Rule-based rewards. Importable without torch.

A reward is a plain function, TRL-compatible: `fn(completions: list[str], **columns) -> list[float | None]`,
where `columns` are the data set row's other fields (`answer`, ...). `None` means "not applicable to this
sample". Rewards are chosen by name in a recipe; `module:function` names a user's own function.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from rewards import code as _code
from rewards import format as _format
from rewards import math as _math
from rewards import shaping as _shaping

RewardFn = Callable[..., list]

REGISTRY: dict[str, RewardFn] = {
    "accuracy": _math.accuracy,
    "think_answer_format": _format.think_answer,
    "number_only_format": _format.number_only,
    "tag_count": _shaping.tag_count,
    "soft_overlong": _shaping.soft_overlong,
    "cosine_length": _shaping.cosine_length,
    "repetition_penalty": _shaping.repetition_penalty,
    "countdown": _shaping.countdown,
    "reasoning_gym": _shaping.reasoning_gym_verifier,
    "code_tests": _code.code_tests,
}

# Columns the trainer adds to every row before scoring (not data set columns).
TRAINER_COLUMNS = ("num_tokens", "finish_reason")


def get_reward(name: str) -> RewardFn:
    """Look a reward up by registry name or `package.module:function`; raise KeyError naming it if unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {name!r}: cannot import ({e})") from None
        if not callable(fn):
            raise KeyError(f"reward {name!r}: not callable")
        return fn
    raise KeyError(f"unknown reward {name!r} (known: {', '.join(sorted(REGISTRY))}, or module:function)")


def required_columns(fn: RewardFn) -> tuple[str, ...]:
    """Data set columns a reward needs: its `columns` attribute, else its required keyword parameters."""
    declared = getattr(fn, "columns", None)
    if declared is not None:
        return tuple(declared)
    params = list(inspect.signature(fn).parameters.values())[1:]
    return tuple(p.name for p in params
                 if p.default is inspect.Parameter.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
