"""Format rewards: they pay for the shape of a completion, not its correctness."""

from __future__ import annotations

import re

# Anchored, no nested quantifiers: linear time on hostile input.
_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_NUMBER_ONLY = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*")


def think_answer(completions: list[str], **_) -> list[float | None]:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (one of each tag), else 0.0."""
    out = []
    for text in completions:
        m = _THINK_ANSWER.fullmatch(text)
        ok = m is not None and all(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
        out.append(float(ok))
    return out


def number_only(completions: list[str], **_) -> list[float | None]:
    """1.0 when the completion is a single number and nothing else (the 'final number only' format)."""
    return [float(_NUMBER_ONLY.fullmatch(text) is not None) for text in completions]
