"""Math answer rewards.

The answer is pulled out of the completion by a named extraction rule (the last `\\boxed{}`, the last number,
or the final line), then compared with the gold answer: plain numbers exactly (fast, no sympy), anything else
with math-verify. A gold answer that cannot be parsed makes the reward not applicable (None), never 0.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

# Linear-time patterns only (no nested quantifiers): completions can be 100k characters of hostile text.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)\s*\$?\s*\.?\s*")

EXTRACTORS = ("boxed", "last_number", "final_line")


_BRACE_TOKENS = re.compile(r"\\boxed\{|[{}]")


def all_boxed(text: str, limit: int = 64) -> list[str]:
    """Contents of the closed `\\boxed{...}` (balanced braces), in order of their opening. One pass with a stack;
    at most `limit` boxes are kept (more than a few is a hedge anyway), so nested boxes cost no quadratic copy."""
    found: list[tuple[int, str]] = []
    stack: list[tuple[bool, int, int]] = []  # (is a box, where its content starts, where it opened)
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group(0)
        if tok == "}":
            if stack:
                is_box, content, opened = stack.pop()
                if is_box and len(found) < limit:
                    found.append((opened, text[content : m.start()]))
        else:
            stack.append((tok != "{", m.end(), m.start()))
    return [inner for _, inner in sorted(found)]


def last_boxed(text: str) -> str | None:
    """Contents of the last closed `\\boxed{...}`, or None (no box, or cut before it closed)."""
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None


def extract_answer(text: str, mode: str = "last_number") -> str | None:
    """The candidate answer of a completion under an extraction rule; None when there is none.

    `boxed`: the last box; several boxes with different contents are a hedge and yield None.
    `last_number`: the last number anywhere in the text. `final_line`: the last non-empty line."""
    if mode == "boxed":
        boxes = all_boxed(text)
        if not boxes or len({b.strip() for b in boxes}) > 1:
            return None
        return boxes[-1].strip()
    if mode == "last_number":
        last = None
        for m in _NUMBER.finditer(text):
            last = m.group(0)
        return last
    if mode == "final_line":
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else None
    raise ValueError(f"unknown extraction mode {mode!r} (one of {', '.join(EXTRACTORS)})")


def parse_number(s: str) -> Fraction | None:
    """An exact rational for plain decimal/integer strings ('1,234', '-0.5', '$7$'); None otherwise."""
    m = _PLAIN_NUMBER.fullmatch(s)
    if not m:
        return None
    digits = m.group(1).replace(",", "")
    if len(digits) > 4000:  # beyond Python's int/str limit: compare as text instead
        return None
    try:
        return Fraction(digits)
    except (ValueError, ZeroDivisionError):
        return None


_INT = re.compile(r"\s*-?\d+\s*")


def _int_text(s: str) -> str | None:
    """Canonical text of a plain integer of any length (no int() call: no 4,300-digit limit)."""
    if not _INT.fullmatch(s):
        return None
    s = s.strip()
    neg = s.startswith("-")
    digits = s.lstrip("-").lstrip("0") or "0"
    return ("-" if neg and digits != "0" else "") + digits


def answers_match(gold: str, pred: str) -> bool | None:
    """True/False, or None when the gold answer cannot be parsed at all."""
    gi, pi = _int_text(gold), _int_text(pred)
    if gi is not None and pi is not None:
        return gi == pi
    g, p = parse_number(gold), parse_number(pred)
    if g is not None and p is not None:
        return g == p
    return _math_verify(gold, pred)


def gold_is_parseable(gold: str) -> bool:
    return _int_text(gold) is not None or parse_number(gold) is not None or _math_verify(gold, gold) is not None


def _math_verify(gold: str, pred: str) -> bool | None:
    from math_verify import parse, verify

    # math-verify's own timeout uses signal.alarm, which only works on the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    g = parse(gold, parsing_timeout=timeout)
    if not g:
        return None
    p = parse(pred, parsing_timeout=timeout)
    if not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout))


def accuracy(completions: list[str], answer: list[str], extract: str = "last_number", **_) -> list[float | None]:
    """1.0 when the extracted answer equals the gold answer, 0.0 otherwise, None when the gold is unparseable."""
    if extract not in EXTRACTORS:
        raise ValueError(f"accuracy: extract must be one of {', '.join(EXTRACTORS)}, got {extract!r}")
    out: list[float | None] = []
    for text, gold in zip(completions, answer, strict=True):
        gold = str(gold)
        if not gold_is_parseable(gold):
            out.append(None)
            continue
        pred = extract_answer(text, extract)
        if pred is None:
            out.append(0.0)
            continue
        ok = answers_match(gold, pred)
        out.append(None if ok is None else float(ok))
    return out


accuracy.columns = ("answer",)
