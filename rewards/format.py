"""Format rewards: they pay for the shape of a completion, not its correctness."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.text import completion_texts

# Anchored, no nested quantifiers: linear time on hostile input.
_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_THINK_ONLY = re.compile(r"\s*<think>.*?</think>", re.DOTALL)
_NUMBER_ONLY = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?\.?")
_LANGUAGE = re.compile(r"[A-Za-z0-9_+#-]{1,32}")


def think_answer(completions: Sequence[Any], require_answer: bool = True, **_) -> list[float | None]:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (one of each tag), else 0.0. `require_answer:
    false` is TRL's `think_format_reward`: one `<think>` block first, closed, and anything after it."""
    out = []
    for text in completion_texts(completions):
        if require_answer:
            ok = (_THINK_ANSWER.fullmatch(text) is not None
                  and all(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>")))
        else:
            ok = _THINK_ONLY.match(text) is not None and text.count("<think>") == 1
        out.append(float(ok))
    return out


def number_only(completions: Sequence[Any], **_) -> list[float | None]:
    """1.0 when the completion is a single number and nothing else (the 'final number only' format)."""
    return [float(_NUMBER_ONLY.fullmatch(text.strip()) is not None) for text in completion_texts(completions)]


def code_format(completions: Sequence[Any], language: str | Sequence[str] = "python",
                **_) -> list[float | None]:
    """open-r1's code format: `<think>` block, then an `<answer>` block that holds a fenced block of the language
    (the data set's `language` column when it has one, else the `language` argument)."""
    texts = completion_texts(completions)
    langs = [language] * len(texts) if isinstance(language, str) else list(language)
    out = []
    for text, lang in zip(texts, langs, strict=True):
        if not _LANGUAGE.fullmatch(str(lang)):
            raise ValueError(f"code_format: not a language name: {lang!r}")
        think = _THINK_ANSWER.fullmatch(text)
        ok = think is not None and re.search(rf"```{re.escape(str(lang))}\b.*?```", think.group(2), re.DOTALL)
        out.append(float(bool(ok)))
    return out
