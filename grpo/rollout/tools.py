"""Tools a model may call during a rollout, and the inline format it calls them in.

A tool is a plain typed function with a docstring, as TRL takes them (`tools=`): built-ins by name (`calculator`,
`python`) or any `module:function`. Every call runs in a killable worker process with a deadline
(rewards/pool.py), so a tool that hangs, forks or eats memory costs one call, never the run: the model gets the
error back as the tool's answer, and the step's metrics count it.

The inline format is for chat templates without tool support (SmolLM2's ChatML renders an assistant's
`tool_calls` as nothing): the model writes `<calculator>17*23</calculator>`, generation stops on the closing tag,
and `<result>391</result>` is appended to the same turn, tokenized as text (a tool's output holding a template's
special tokens cannot end the turn or fake one).
"""

from __future__ import annotations

import ast
import importlib
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
TRUNCATED = " [...] "  # between the head and the tail of an output cut to max_tool_output_tokens

# ------------------------------------------------------------------------------------------------ built-ins

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 1000  # an operand or result longer than this is refused: 9**9**9 must not eat the worker


def _exact(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _exact(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))  # 0.1 is the decimal one tenth, not the binary float
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_exact(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _exact(node.left), _exact(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > 4096 or (a == 0 and b < 0):
                raise ValueError("exponents must be whole numbers of at most 4096 (and 0 has no negative powers)")
            if abs(a.numerator) > 1 and abs(b) * len(str(abs(a.numerator))) > MAX_DIGITS:
                raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        if b == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
            raise ZeroDivisionError("division by zero")
        out = _BINARY[type(node.op)](a, b)
        out = Fraction(out)
        if len(str(abs(out.numerator))) > MAX_DIGITS or len(str(out.denominator)) > MAX_DIGITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return out
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r} (numbers, + - * / // % ** and parentheses only)")


def _show(x: Fraction) -> str:
    """An integer as itself; a terminating decimal in full; any other fraction as p/q."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    digits = 0
    while (x * 10**digits).denominator != 1:
        digits += 1
    scaled = abs(x.numerator) * 10**digits // x.denominator
    sign = "-" if x < 0 else ""
    return f"{sign}{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers combined with + - * / // % ** and parentheses, e.g. 17*23 or (2+3)/4
    """
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # 1,234 -> 1234
    if not expr:
        raise ValueError("empty expression")
    if len(expr) > 500:
        raise ValueError("expression longer than 500 characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r}: {e.msg}") from None
    return _show(_exact(tree))


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: a complete Python program; print the values you need
    """
    from rewards.sandbox import Limits, run_python

    r = run_python(code, limits=Limits(wall_seconds=5.0, cpu_seconds=5, memory_mb=512, output_bytes=1 << 16))
    if r.status == "timeout":
        raise TimeoutError("the program ran past 5 s")
    out = r.stdout
    if r.returncode:
        out += (r.stderr.strip().splitlines() or ["(no error message)"])[-1]
    return out


BUILTIN: dict[str, Callable[..., Any]] = {"calculator": calculator, "python": python}


@dataclass
class Tool:
    name: str
    fn: Callable[..., Any]
    first_arg: str  # the argument an inline call's text fills

    def schema(self) -> dict[str, Any]:
        """The JSON schema a chat template's `tools=` takes, from the type hints and the docstring."""
        from transformers.utils import get_json_schema

        return get_json_schema(self.fn)


def load_tool(spec: str) -> Tool:
    """A built-in by name or `module:function`; errors name the spec."""
    if spec in BUILTIN:
        fn = BUILTIN[spec]
    else:
        mod, sep, attr = spec.partition(":")
        if not sep:
            raise ValueError(f"unknown tool {spec!r} (built-ins: {', '.join(BUILTIN)}; or module:function)")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"tool {spec!r} cannot be imported: {e}") from None
    import inspect

    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                              p.KEYWORD_ONLY)]
    if not params:
        raise ValueError(f"tool {spec!r} takes no argument: an inline call passes its text as the first one")
    name = fn.__name__
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise ValueError(f"tool {spec!r}: its name {name!r} cannot be a tag")
    return Tool(name, fn, params[0].name)


def call_tool(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """What a worker runs for one call (top level, so that it pickles): the tool's answer as text."""
    out = fn(**kwargs)
    return out if isinstance(out, str) else repr(out) if not isinstance(out, int | float) else str(out)


# ---------------------------------------------------------------------------------------------- inline format

@dataclass
class InlineCall:
    tool: str | None  # None: the call could not be read (unknown tool)
    arguments: str


class InlineFormat:
    """`<name>ARGS</name>` calls tool `name` with ARGS as its first argument; `<result>OUTPUT</result>` answers."""

    def __init__(self, tools: list[Tool]):
        self.tools = {t.name: t for t in tools}

    def stops(self) -> tuple[str, ...]:
        return tuple(f"</{name}>" for name in self.tools)

    def parse(self, text: str, stop: str | None) -> InlineCall | None:
        """The call that ended this turn (on its closing tag `stop`), or None when the turn did not end on one. A
        missing opening tag reads as a call with no tool (a malformed call, answered as an error)."""
        if stop is None or stop not in self.stops():
            return None
        name, end = stop[2:-1], text.rfind(stop)
        start = text.rfind(f"<{name}>", 0, max(end, 0))
        if end < 0 or start < 0:
            return InlineCall(None, text)
        return InlineCall(name, text[start + len(name) + 2 : end].strip())

    @staticmethod
    def answer(output: str) -> str:
        return f"{RESULT_OPEN}{output}{RESULT_CLOSE}"


def truncate_ids(ids: list[int], limit: int, marker: list[int]) -> list[int]:
    """At most `limit` ids: the head and the tail kept, `marker` between (a tool's long output keeps its start and
    its end, where errors and final values are)."""
    if len(ids) <= limit:
        return ids
    room = max(limit - len(marker), 0)
    head = (room + 1) // 2
    return ids[:head] + marker + ids[len(ids) - (room - head) :] if room else ids[:limit]
