"""Math answer rewards.

The answer is pulled out of the completion by a named extraction rule (the last `\\boxed{}`, the last number,
the final line, or math-verify's own extraction over the whole completion), then compared with the gold answer:
plain numbers exactly (fast, no sympy), anything else with math-verify.

What math-verify is given matters as much as what it does with it. Handed a bare LaTeX string such as
`3\\sqrt{13}`, its LaTeX extractor finds no delimiters and its expression extractor falls back to the first number
(`3`), which pays a wrong answer 1.0. So both the gold answer and an extracted prediction are put inside `$...$`
unless they already carry math delimiters. A gold answer that is prose (`yes`, `the second one`) or that math-verify
cannot parse makes the reward not applicable (None), never 0.

A hedge is never paid: several different boxes, or several candidates inside one box (`3 or 5`, `3; 5`, `3, 5`,
`3 \\quad 5`) against a gold answer that is a single value. `multi_box: true` is the opt-in for problems whose
answer is several boxes (they are joined into one set and compared with the gold set).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from rewards.text import completion_texts

# Linear-time patterns only (no nested quantifiers): completions can be 100k characters of hostile text.
# A number's sign counts only where it cannot be a binary operator (`10-7` ends in 7, not -7).
_NUMBER = re.compile(r"(?<![\w)\]}])[+-]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w)\]}])[+-]?\.\d+")
# A plain number: optional sign, digits with commas only as thousands separators, optional decimals; optional
# surrounding `$` and a trailing full stop.
_PLAIN_NUMBER = re.compile(r"(?:\$\s*)?([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)(?:\s*\$)?\.?")
_INT = re.compile(r"\s*[+-]?\d+\s*")

EXTRACTORS = ("boxed", "last_number", "final_line", "math_verify")

_BRACE_TOKENS = re.compile(r"\\boxed\s*\{|\\fbox\s*\{|[{}]")
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed\s*\{|\\begin\{(?:equation|align|displaymath)")
# Separators between candidate answers: `or`/`and` as words (also inside \text{}), `;`, \lor, \vee, \quad.
_ALTERNATIVE = re.compile(r"\b(?:or|and)\b|;|\\lor\b|\\vee\b|\\q?quad\b\s*(?=[-+\d(]|\\d?frac|\\sqrt)",
                          re.IGNORECASE)
# LaTeX spacing commands (thin, medium, thick, negative space): typography, never a separator.
_SPACING = re.compile(r"\\[,;:!> ]")
# Words that are mathematics, not prose, when a gold answer is written without LaTeX.
_MATH_WORDS = frozenset("""sqrt sin cos tan cot sec csc log ln exp pi arcsin arccos arctan sinh cosh tanh infty inf
    oo max min gcd lcm mod frac cdot times div pm mp deg dfrac tfrac text mathrm mbox circ""".split())
_WORD = re.compile(r"(?<!\\)\b[A-Za-z]{3,}\b")
_END_ENV = re.compile(r"\\end\{([A-Za-z*]{1,20})\}$")


def all_boxed(text: str, limit: int = 64) -> list[str]:
    """Contents of the closed `\\boxed{...}` / `\\fbox{...}` (balanced braces), in order of their opening. One pass
    with a stack; at most `limit` boxes are kept (more than a few is a hedge anyway), so nested boxes cost no
    quadratic copy."""
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


def _final_line(text: str) -> str | None:
    """The last non-empty line; a display-math block split over lines (`\\[ ... \\]`, `$$ ... $$`, an environment
    such as `\\begin{pmatrix} ... \\end{pmatrix}`) is kept whole."""
    body = text.rstrip().rstrip(".").rstrip()
    env = _END_ENV.search(body)
    pairs = [("\\]", "\\["), ("$$", "$$")] + ([(env.group(0), f"\\begin{{{env.group(1)}}}")] if env else [])
    for close, open_ in pairs:
        if body.endswith(close):
            start = body.rfind(open_, 0, len(body) - len(close))
            if start >= 0:
                line_start = body.rfind("\n", 0, start) + 1
                return " ".join(body[line_start:].split())
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def extract_answer(text: str, mode: str = "last_number", multi_box: bool = False) -> str | None:
    """The candidate answer of a completion under an extraction rule; None when there is none.

    `boxed`: the box; several boxes with different contents are a hedge and yield None (with `multi_box`, they
    are the answer: joined with commas). `last_number`: the last number anywhere in the text. `final_line`: the last
    non-empty line (or display-math block). `math_verify`: like `boxed` when the completion has a box, else the
    whole completion (math-verify's own extraction then finds the answer in it)."""
    if mode in ("boxed", "math_verify"):
        boxes = list(dict.fromkeys(b.strip() for b in all_boxed(text)))
        if len(boxes) > 1:
            if multi_box:
                return ", ".join(boxes)
            if len(boxes) > 4 or not all(answers_match(boxes[0], b) for b in boxes[1:]):
                return None  # different values: a hedge (the same value written twice, `18` and `\$18`, is not)
            return boxes[-1]
        if boxes:
            return boxes[0]
        return text if mode == "math_verify" else None
    if mode == "last_number":
        last = None
        for m in _NUMBER.finditer(text):
            last = m.group(0)
        return last
    if mode == "final_line":
        return _final_line(text)
    raise ValueError(f"unknown extraction mode {mode!r} (one of {', '.join(EXTRACTORS)})")


_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,\\!\s*|\\,|\\!)(?=\d{3}(?!\d))")


def normalise_thousands(s: str) -> str:
    """LaTeX's thousands separators (`12{,}000`, `12,\\!000`, `12\\,000`) as plain commas."""
    return _LATEX_THOUSANDS.sub(",", s)


def parse_number(s: str) -> Fraction | None:
    """An exact rational for plain decimal/integer strings ('1,234', '-0.5', '+3', '$7$'); None otherwise (also
    for '1,2' or '1,22', where a comma is not a thousands separator)."""
    m = _PLAIN_NUMBER.fullmatch(normalise_thousands(s).strip())
    if not m:
        return None
    digits = m.group(1).replace(",", "")
    if len(digits) > 4000:  # beyond Python's int/str limit: compare as text instead
        return None
    try:
        return Fraction(digits)
    except (ValueError, ZeroDivisionError):
        return None


def _int_text(s: str) -> str | None:
    """Canonical text of a plain integer of any length (no int() call: no 4,300-digit limit)."""
    if not _INT.fullmatch(s):
        return None
    s = s.strip()
    neg = s.startswith("-")
    digits = s.lstrip("+-").lstrip("0") or "0"
    return ("-" if neg and digits != "0" else "") + digits


def _top_level_commas(s: str) -> bool:
    """A comma outside every bracket that is not a thousands separator (`1,2`, `x, y`; not `1,234` or `(1,2)`)."""
    depth = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            thousands = (i > 0 and s[i - 1].isdigit() and s[i + 1 : i + 4].isdigit() and len(s[i + 1 : i + 4]) == 3
                         and not s[i + 4 : i + 5].isdigit())
            if not thousands:
                return True
    return False


def is_multi_valued(s: str) -> bool:
    """Several candidate values: joined by words (`or`, `and`), `;`, `\\lor`, `\\quad`, or top-level commas."""
    inner = _SPACING.sub(" ", normalise_thousands(_strip_delimiters(s)))
    return bool(_ALTERNATIVE.search(inner)) or _top_level_commas(inner)


def _strip_delimiters(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(open_) and s.endswith(close) and len(s) >= len(open_) + len(close):
            return s[len(open_) : len(s) - len(close)].strip()
    return s


def delimit(s: str) -> str:
    """`$s$` unless `s` already carries math delimiters (`$`, `\\(`, `\\[`, `\\boxed{}`), so that math-verify
    parses the whole expression instead of falling back to its first number."""
    s = s.strip()
    # Inline math does not span lines for math-verify: a bare multi-line answer (a matrix) is joined first.
    return s if _DELIMITED.search(s) else f"${' '.join(s.split())}$"


def is_prose(gold: str) -> bool:
    """A gold answer written in words without LaTeX (`yes`, `the red one`): no math check applies to it. A number
    followed by its unit (`10 cm`, `5 dollars`) is not prose: see `strip_unit`."""
    if _DELIMITED.search(gold) or "\\" in gold or strip_unit(gold) != gold:
        return False
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(gold))


_NUMBER_WITH_UNIT = re.compile(r"\s*([+-]?[\d.,]*\d)((?:\s+[A-Za-z]{2,20}){1,3})\s*\.?")


def strip_unit(text: str) -> str:
    """`10 cm` -> `10`: plain text that is a number and a unit (words of two letters or more, none of them
    mathematics: `5 pi` and `5 x` stay as they are) is compared as the number."""
    m = _NUMBER_WITH_UNIT.fullmatch(text)
    if m is None or any(w.lower() in _MATH_WORDS or w.lower() in ("or", "and") for w in m.group(2).split()):
        return text
    return m.group(1)


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify's own timeout uses signal.alarm, which only works on the main thread (the scoring workers run
    # rewards there; a worker's wall-clock deadline covers the other case).
    main = threading.current_thread() is threading.main_thread()
    return (5, 5) if main else (None, None)


def _mv_parse(text: str, config: Sequence[Any], **kw: Any) -> list[Any]:
    """math-verify's parse, except that a timeout propagates (the sample is then an error, never a 0 for a right
    answer that was slow to parse); any other failure to parse is an empty parse."""
    from math_verify import parse

    parsing_timeout, _ = _timeouts()
    try:
        return parse(text, extraction_config=config, parsing_timeout=parsing_timeout, raise_on_error=True, **kw)
    except Exception:  # noqa: BLE001 - math-verify's own parse errors; its TimeoutException is a BaseException
        return []


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    """math-verify's parse of a delimited gold answer; cached, since a group's G completions share one gold (a
    timeout raises, so it is never cached as "unparseable")."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    parsed = _mv_parse(delimit(gold), [LatexExtractionConfig(), ExprExtractionConfig()])
    # A gold that only came back as its raw text (math-verify's fallback) was not understood.
    return tuple(parsed) if any(not isinstance(p, str) for p in parsed) else ()


def _parse_pred(pred: str, whole_completion: bool) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if whole_completion:  # math-verify's own search of a completion without a box: LaTeX math, then expressions
        return _mv_parse(pred, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    return _mv_parse(delimit(pred), [LatexExtractionConfig(), ExprExtractionConfig()])


def gold_is_multi_valued(gold: str) -> bool:
    """The gold answer lists several values (a set, a tuple, `1, 2`): then several boxes or several values in one
    box are the answer, not a hedge. Read from math-verify's parse, so a gold written as a whole solution counts
    only its final answer."""
    if parse_number(gold) is not None or is_prose(gold):
        return False
    parsed = _parse_gold(gold.strip())
    if not parsed:
        return is_multi_valued(gold)
    from sympy import FiniteSet, Tuple

    if isinstance(parsed[0], (FiniteSet, Tuple, list, tuple)):
        return True
    return isinstance(parsed[-1], str) and is_multi_valued(parsed[-1])


def gold_is_parseable(gold: str) -> bool:
    """Whether a math check applies to this gold answer at all."""
    gold = strip_unit(gold)
    if _int_text(gold) is not None or parse_number(gold) is not None:
        return True
    if is_prose(gold):
        return False
    return bool(_parse_gold(gold.strip()))


def answers_match(gold: str, pred: str, precision: int = 6, strict: bool = True, set_relations: bool = False,
                  whole_completion: bool = False) -> bool | None:
    """True/False, or None when the gold answer cannot be parsed at all. Options are math-verify's:
    `precision` (decimal places numbers are rounded to), `strict` (symbols and variables must match),
    `set_relations` (a set gold also matches an equivalent inequality)."""
    gold = strip_unit(gold)
    if not whole_completion:
        pred = strip_unit(pred)
        gi, pi = _int_text(gold), _int_text(pred)
        if gi is not None and pi is not None:
            return gi == pi
        g, p = parse_number(gold), parse_number(pred)
        if g is not None and p is not None:
            return g == p
    if is_prose(gold):
        return None
    gold_parsed = _parse_gold(gold.strip())
    if not gold_parsed:
        return None
    if not whole_completion and len(pred) > 10 * len(gold) + 1000:
        return False  # an "answer" a thousand characters longer than the gold is not it (and costs sympy seconds)
    if not whole_completion and is_multi_valued(pred) and not gold_is_multi_valued(gold):
        return False  # several candidates in one answer against a single value: a hedge
    pred_parsed = _parse_pred(pred, whole_completion)
    if not pred_parsed:
        return False
    from math_verify import verify

    _, verify_timeout = _timeouts()
    for g in gold_parsed:  # any pair that matches, as math-verify's own verify does over its lists
        for p in pred_parsed:
            try:
                if verify(g, p, float_rounding=precision, strict=strict, allow_set_relation_comp=set_relations,
                          timeout_seconds=verify_timeout, raise_on_error=True):
                    return True
            except Exception:  # noqa: BLE001 - a pair sympy cannot compare is no match; a timeout propagates
                continue
    return False


def accuracy(completions: Sequence[Any], answer: Sequence[Any], extract: str = "last_number",
             multi_box: bool = False, precision: int = 6, strict: bool = True, set_relations: bool = False,
             after: str | None = None, **_) -> list[float | None]:
    """1.0 when the extracted answer equals the gold answer, 0.0 otherwise, None when the gold is unparseable or
    prose. `extract: math_verify` reads the whole completion as TRL's and open-r1's accuracy rewards do. `after:
    "</think>"` reads only the text after the last `</think>` and pays 0 when it never came (TRL's
    `reasoning_accuracy_reward`), so an answer inside unfinished reasoning earns nothing."""
    if extract not in EXTRACTORS:
        raise ValueError(f"accuracy: extract must be one of {', '.join(EXTRACTORS)}, got {extract!r}")
    if not isinstance(precision, int) or precision < 0:
        raise ValueError(f"accuracy: precision must be an integer >= 0, got {precision!r}")
    out: list[float | None] = []
    for text, gold in zip(completion_texts(completions), answer, strict=True):
        gold = str(gold)
        if not gold_is_parseable(gold):
            out.append(None)
            continue
        if after:
            if after not in text:
                out.append(0.0)
                continue
            text = text.rsplit(after, 1)[1]
        boxes_matter = extract in ("boxed", "math_verify")
        pred = extract_answer(text, extract, multi_box=multi_box or (boxes_matter and gold_is_multi_valued(gold)))
        if pred is None:
            out.append(0.0)
            continue
        # a final line in words ("She sold 72 clips.") is searched by math-verify, not read as one expression
        whole = (extract == "math_verify" and pred is text) or (extract == "final_line" and is_prose(pred))
        ok = answers_match(gold, pred, precision, strict, set_relations, whole_completion=whole)
        out.append(None if ok is None else float(ok))
    return out


accuracy.columns = ("answer",)
