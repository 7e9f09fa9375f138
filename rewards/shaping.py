"""Shaping and task rewards: tag counts, length shaping, repetition, countdown, any reasoning-gym verifier.

Length-based rewards read `num_tokens` (completion length in tokens), a column the trainer adds to every row.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rewards.math import accuracy
from rewards.text import completion_texts

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def last_answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer>, the match `re.findall(r"<answer>(.*?)</answer>")` ends with,
    in linear time: that regex is quadratic on an unclosed tag repeated (64k characters of "<answer>": 2 s)."""
    found, pos = None, 0
    while (i := text.find("<answer>", pos)) >= 0:
        j = text.find("</answer>", i + 8)
        if j < 0:
            break
        found, pos = text[i + 8 : j], j + 9
    return found


_WORD = re.compile(r"\S+")


def tag_count(completions: Sequence[Any], **_) -> list[float | None]:
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once (partial credit)."""
    return [sum(0.25 for t in TAGS if c.count(t) == 1) for c in completion_texts(completions)]


# Markers of an explicit step: "Step 1:", a numbered line, a bullet, an ordinal word (open-r1's list).
_STEP = re.compile(r"Step \d+:|^\d+\.|\n\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,")


def reasoning_steps(completions: Sequence[Any], min_steps: int = 3, **_) -> list[float | None]:
    """Share of `min_steps` explicit step markers present, capped at 1 (open-r1's `reasoning_steps_reward`, which
    also counts numbered lines after the first)."""
    if min_steps < 1:
        raise ValueError(f"reasoning_steps: min_steps must be >= 1, got {min_steps}")
    return [min(1.0, len(_STEP.findall(c)) / min_steps) for c in completion_texts(completions)]


def soft_overlong(completions: Sequence[Any], num_tokens: list[int], max_tokens: int, buffer: int,
                  **_) -> list[float | None]:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer, then linear down to -1 at max_tokens, -1 beyond."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"soft_overlong: need 0 < buffer <= max_tokens, got buffer={buffer}, max_tokens={max_tokens}")
    out = []
    for n in num_tokens:
        free = max_tokens - buffer
        out.append(0.0 if n <= free else (-1.0 if n > max_tokens else (free - n) / buffer))
    return out


soft_overlong.columns = ("num_tokens",)


def cosine_length(completions: Sequence[Any], answer: list[str], num_tokens: list[int], max_tokens: int,
                  correct_short: float = 1.0, correct_long: float = 0.5, wrong_short: float = -0.5,
                  wrong_long: float = 0.0, extract: str = "last_number", **_) -> list[float | None]:
    """Correctness scaled by length on a half cosine (Yeo et al., 2025): a right answer pays more when short, a
    wrong one costs less when long (the model may keep thinking). Not applicable where the gold is unparseable."""
    acc = accuracy(completions, answer, extract=extract)
    out: list[float | None] = []
    for a, n in zip(acc, num_tokens, strict=True):
        if a is None:
            out.append(None)
            continue
        short, long_ = (correct_short, correct_long) if a == 1.0 else (wrong_short, wrong_long)
        progress = min(n, max_tokens) / max_tokens
        out.append(long_ + 0.5 * (short - long_) * (1.0 + math.cos(math.pi * progress)))
    return out


cosine_length.columns = ("answer", "num_tokens")


def len_reward(completions: Sequence[Any], answer: list[str], num_tokens: list[int], extract: str = "last_number",
               **_) -> list[float | None]:
    """Kimi 1.5's length reward, relative to the other completions of the same prompt: with lambda = 0.5 -
    (len - shortest) / (longest - shortest), a right answer gets lambda and a wrong one min(0, lambda); all 0 when
    every length is equal. Lengths in tokens. A sample whose gold is unparseable is not applicable (open-r1 counts
    it as right). The trainer calls it once per group (`batched`)."""
    acc = accuracy(completions, answer, extract=extract)
    lo, hi = (min(num_tokens), max(num_tokens)) if num_tokens else (0, 0)
    out: list[float | None] = []
    for a, n in zip(acc, num_tokens, strict=True):
        lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
        out.append(None if a is None else (lam if a == 1.0 else min(0.0, lam)))
    return out


len_reward.columns = ("answer", "num_tokens")
len_reward.batched = True


def repetition_penalty(completions: Sequence[Any], ngram: int = 3, max_penalty: float = -1.0, unit: str = "words",
                       completion_ids: list[list[int]] | None = None, **_) -> list[float | None]:
    """max_penalty x the share of repeated n-grams (0 for text shorter than one n-gram). `unit: words` counts
    lower-cased words (open-r1), `unit: tokens` the completion's token ids (TRL)."""
    if max_penalty > 0:
        raise ValueError(f"repetition_penalty: max_penalty must be <= 0, got {max_penalty}")
    if unit not in ("words", "tokens"):
        raise ValueError(f"repetition_penalty: unit must be 'words' or 'tokens', got {unit!r}")
    if unit == "tokens":
        if completion_ids is None:
            raise ValueError("repetition_penalty: unit 'tokens' needs completion_ids")
        seqs: list[list[Any]] = [list(ids) for ids in completion_ids]
    else:
        seqs = [_WORD.findall(c.lower()) for c in completion_texts(completions)]
    out = []
    for words in seqs:
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(0.0 if not grams else max_penalty * (1.0 - len(set(grams)) / len(grams)))
    return out


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _safe_eval(node: ast.AST, used: list[int]) -> float:
    """+ - * / on integer literals only; records the literals used. No eval(), no power, no names."""
    if isinstance(node, ast.Expression):
        return _safe_eval(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_safe_eval(node.left, used), _safe_eval(node.right, used))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_safe_eval(node.operand, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return node.value
    raise ValueError("only integers and + - * / are allowed")


def _meta(metadata: Any) -> dict[str, Any]:
    if isinstance(metadata, str):
        return json.loads(metadata) if metadata else {}
    return dict(metadata or {})


def countdown(completions: Sequence[Any], metadata: list[Any], **_) -> list[float | None]:
    """1.0 when the expression (inside <answer>, else the last line) uses each given number at most once, only
    + - * /, and equals the target. Reads `numbers` and `target` from the row's metadata."""
    out: list[float | None] = []
    for c, m in zip(completion_texts(completions), metadata, strict=True):
        meta = _meta(m)
        if "numbers" not in meta or "target" not in meta:
            out.append(None)
            continue
        found = last_answer_tag(c)
        expr = found if found is not None else (c.strip().splitlines() or [""])[-1]
        expr = expr.split("=")[0].strip()
        if not expr or len(expr) > 200:
            out.append(0.0)
            continue
        used: list[int] = []
        try:
            val = _safe_eval(ast.parse(expr, mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            out.append(0.0)
            continue
        ok = not (Counter(used) - Counter(int(x) for x in meta["numbers"])) and abs(val - meta["target"]) < 1e-6
        out.append(float(ok))
    return out


countdown.columns = ("metadata",)


def reasoning_gym_verifier(completions: Sequence[Any], question: list[str], answer: list[str], metadata: list[Any],
                           extract: str = "answer_tag", **_) -> list[float | None]:
    """Any reasoning-gym task's own scorer. The candidate answer is the last <answer>...</answer> (`answer_tag`),
    the last non-empty line (`final_line`) or the whole completion (`full`)."""
    import reasoning_gym

    if extract not in ("answer_tag", "final_line", "full"):
        raise ValueError(f"reasoning_gym_verifier: extract must be answer_tag, final_line or full, got {extract!r}")
    out: list[float | None] = []
    cache: dict[str, Any] = {}
    for c, q, a, m in zip(completion_texts(completions), question, answer, metadata, strict=True):
        meta = _meta(m)
        task = meta.get("source_dataset")
        if not task:
            out.append(None)
            continue
        if task not in cache:
            cache[task] = reasoning_gym.get_score_answer_fn(task)
        if extract == "answer_tag":
            found = last_answer_tag(c)
            cand = found.strip() if found is not None else None
        elif extract == "final_line":
            lines = [ln for ln in c.strip().splitlines() if ln.strip()]
            cand = lines[-1].strip() if lines else None
        else:
            cand = c.strip()
        out.append(0.0 if cand is None else float(cache[task](cand, {"question": q, "answer": a, "metadata": meta})))
    return out


reasoning_gym_verifier.columns = ("question", "answer", "metadata")
