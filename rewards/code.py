"""Code execution reward: the completion's last Python block runs against the row's test cases, in the sandbox.

`tests` (a data set column: a JSON string or the parsed object) is either
- asserts: `["assert f(1) == 2", ...]` or `{"asserts": [...], "setup": "import math"}` (`assert_case`, Sandbox
  Fusion's key, is read the same), or
- stdin/stdout pairs: `{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}` (a `null` input is empty stdin), or
- call-based (APPS / TACO / LiveCodeBench / verl's prime_code): the same with `"fn_name": "f"`; each input is the
  call's arguments, one JSON value per line (or a list of them), each output the JSON of the return value. The
  function is a top-level `def f`, else a method of a LeetCode-style `class Solution` (instantiated with no
  arguments). A one-element list output also accepts its element (APPS wraps return values that way).
Empty or missing tests make the reward not applicable (None): `all([])` is True, but nothing was checked. A test
format it does not know is an error (naming the keys it got), never a 0.

The verdict is never taken from inside the sandbox. For `assert EXPR == LITERAL` the sandbox only evaluates EXPR
and prints its value as plain JSON; the parent compares it with the literal, which never enters the sandbox (so an
object whose `__eq__` always says True, a patched `assertEqual` or `sys.exit(0)` before the tests cannot pass).
Other asserts are evaluated whole and must serialise to exactly `true`. stdin/stdout output is compared line by
line in the parent, every line (a program printing only the first line fails). Timed-out tests count as failed.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from collections.abc import Sequence
from typing import Any

from rewards.sandbox import Limits, run_python
from rewards.text import completion_texts

# Call-based problems (LeetCode, APPS, LiveCodeBench) are written against a judge that has already imported the
# usual modules (`List`, `defaultdict`, `heapq` without an import line); peers' harnesses do the same.
_CALL_PRELUDE = ("from typing import *\nfrom collections import *\nimport bisect, collections, functools, heapq, "
                 "itertools, math, operator, re, string\nfrom functools import lru_cache, reduce\n"
                 "from itertools import accumulate, combinations, permutations, product\n")

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_HARNESS = r'''
import json, sys
spec = json.load(open("/harness/tests.json"))
src = open("/harness/candidate.py", encoding="utf-8", errors="replace").read()
nonce = spec["nonce"]
out = sys.__stdout__

def enc(v):
    if type(v) in (set, frozenset):
        return {"__set__": sorted(json.dumps(enc(x), sort_keys=True) for x in v)}
    if type(v) is tuple:
        return [enc(x) for x in v]
    if type(v) is list:
        return [enc(x) for x in v]
    if type(v) is dict:
        return {str(k): enc(x) for k, x in v.items()}
    if v is None or type(v) in (bool, int, float, str):
        return v
    raise TypeError("not a plain value: " + type(v).__name__)

def report(i, ok, val):
    out.write("\n" + nonce + " " + json.dumps({"i": i, "ok": ok, "v": val}) + "\n")
    out.flush()

def run(ns, exprs=spec["exprs"], _eval=eval, _compile=compile, _enc=enc, _report=report):
    # builtins are bound here, before the candidate runs: patching builtins.eval later changes nothing
    for i, expr in enumerate(exprs):
        try:
            _report(i, True, _enc(_eval(_compile(expr, "test", "eval"), ns)))
        except BaseException as e:
            _report(i, False, type(e).__name__)

ns = {"__name__": "__candidate__"}
exec(compile(spec["setup"] + "\n" + src, "candidate.py", "exec"), ns)
run(ns)
'''


def extract_code(text: str, unfenced: bool = False) -> str | None:
    """The last fenced Python block, else None (prose is not code); with `unfenced`, a completion without any
    fence is taken whole as the program (for prompts that ask for bare code)."""
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    return text if unfenced and "```" not in text and text.strip() else None


def _call_args(raw: Any) -> list[Any]:
    """A call-based test's arguments: a list as is, or a string holding one JSON value per line."""
    if isinstance(raw, list):
        return raw
    lines = [ln for ln in str(raw).split("\n") if ln.strip()]
    try:
        return [json.loads(ln) for ln in lines]
    except ValueError as e:
        raise ValueError(f"tests: a call-based input line is not JSON ({e}): {str(raw)[:80]!r}") from None


def _call_expected(raw: Any) -> Any:
    """The expected return value: JSON text decoded (LiveCodeBench, verl), else the string itself."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def parse_tests(tests: Any) -> dict[str, Any] | None:
    if tests is None:
        return None
    if isinstance(tests, str):
        tests = tests.strip()
        if not tests:
            return None
        tests = json.loads(tests)
    if isinstance(tests, list):
        tests = {"asserts": tests}
    if not isinstance(tests, dict):
        raise ValueError(f"tests: expected a list or a mapping, got {type(tests).__name__}")
    if "asserts" in tests or "assert_case" in tests:  # ours, and Sandbox Fusion's name for the same
        asserts = list(tests.get("asserts") or tests.get("assert_case") or [])
        return {"asserts": [str(a) for a in asserts], "setup": str(tests.get("setup", ""))} if asserts else None
    if "inputs" in tests and "outputs" in tests:
        ins, outs = list(tests["inputs"] or []), list(tests["outputs"] or [])
        if len(ins) != len(outs):
            raise ValueError(f"tests: {len(ins)} inputs but {len(outs)} outputs")
        if not ins:
            return None
        fn_name = tests.get("fn_name")
        if fn_name:
            if not str(fn_name).isidentifier():
                raise ValueError(f"tests: fn_name {fn_name!r} is not a Python name")
            return {"fn_name": str(fn_name), "args": [_call_args(i) for i in ins],
                    "expected": [_call_expected(o) for o in outs]}
        return {"inputs": ["" if i is None else i for i in ins], "outputs": outs}
    if not tests:
        return None
    raise ValueError(f"tests: unsupported format with keys {sorted(tests)} (expected a list of asserts, "
                     "{'asserts': [...]}, or {'inputs': [...], 'outputs': [...]} with an optional 'fn_name')")


def _split_assert(test: str) -> tuple[str, Any, bool]:
    """(expression the sandbox evaluates, expected value, whether the literal is compared in the parent)."""
    node = ast.parse(test.strip(), mode="exec").body
    if len(node) != 1 or not isinstance(node[0], ast.Assert):
        raise ValueError(f"not a single assert statement: {test[:80]!r}")
    t = node[0].test
    if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
        for lhs, rhs in ((t.left, t.comparators[0]), (t.comparators[0], t.left)):
            try:
                expected = ast.literal_eval(rhs)
            except (ValueError, SyntaxError, TypeError):
                continue
            return ast.unparse(lhs), expected, True
    return ast.unparse(t), True, False


def _canon(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return {"__set__": sorted(json.dumps(_canon(x), sort_keys=True) for x in v)}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in v.items()}
    return v


def _equal(got: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, float) or isinstance(got, float):
        return (isinstance(got, (int, float)) and isinstance(expected, (int, float))
                and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12))
    if isinstance(expected, list) and isinstance(got, list):
        return len(got) == len(expected) and all(_equal(a, b) for a, b in zip(got, expected, strict=True))
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(_equal(got[k], expected[k]) for k in expected)
    return type(got) is type(expected) and got == expected


def _call_target(code: str, fn_name: str) -> str:
    """How to call the candidate's function: a top-level `def`, else a method of `class Solution`."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return fn_name  # the run fails on the syntax error and every test with it
    if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn_name for n in body):
        return fn_name
    for n in body:
        if isinstance(n, ast.ClassDef) and n.name == "Solution":
            return f"Solution().{fn_name}"
    return fn_name


def _run_calls(code: str, spec: dict[str, Any], limits: Limits) -> list[bool]:
    target = _call_target(code, spec["fn_name"])
    parts = [(f"{target}(*{args!r})", expected, True) for args, expected in zip(spec["args"], spec["expected"],
                                                                                strict=True)]
    results = _run_exprs(code, parts, _CALL_PRELUDE, limits)
    out = []
    for (_, expected, _), got in zip(parts, results, strict=True):
        ok = got is not _FAILED and (_equal(got, _canon(expected))
                                     or (isinstance(expected, list) and len(expected) == 1
                                         and _equal(got, _canon(expected[0]))))
        out.append(bool(ok))
    return out


_FAILED = object()


def _run_asserts(code: str, spec: dict[str, Any], limits: Limits) -> list[bool]:
    parts = [_split_assert(a) for a in spec["asserts"]]
    results = _run_exprs(code, parts, spec["setup"], limits)
    return [got is not _FAILED and _equal(got, _canon(expected))
            for (_, expected, _), got in zip(parts, results, strict=True)]


def _run_exprs(code: str, parts: list[tuple[str, Any, bool]], setup: str, limits: Limits) -> list[Any]:
    """Each expression's value as the sandbox reported it (plain JSON), or _FAILED."""
    nonce = "GRPO-" + secrets.token_hex(16)
    tests = {"nonce": nonce, "setup": setup, "exprs": [p[0] for p in parts]}
    r = run_python(_HARNESS, limits=limits, files={"tests.json": json.dumps(tests), "candidate.py": code})
    _check_started(r)
    seen: dict[int, list[dict]] = {}
    for line in r.stdout.splitlines():
        if line.startswith(nonce + " "):
            try:
                msg = json.loads(line[len(nonce) + 1 :])
                seen.setdefault(int(msg["i"]), []).append(msg)
            except (ValueError, KeyError, TypeError):
                return [_FAILED] * len(parts)
    if any(len(v) != 1 for v in seen.values()):
        return [_FAILED] * len(parts)  # a forged or repeated report: nothing from this run is trusted
    out = []
    for i in range(len(parts)):
        msg = seen.get(i, [None])[0]
        out.append(msg["v"] if msg and msg["ok"] else _FAILED)
    return out


def _check_started(r: Any) -> None:
    """A sandbox that could not start (fork limits, a broken bubblewrap) is an error of the reward, never a 0."""
    if r.status == "error":
        raise RuntimeError(f"code_tests: the sandbox did not start: {r.stderr[:200]}")


def _normalise_output(s: str) -> list[str]:
    lines = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _run_io(code: str, spec: dict[str, Any], limits: Limits) -> list[bool]:
    out = []
    for stdin, expected in zip(spec["inputs"], spec["outputs"], strict=True):
        r = run_python(code, stdin=str(stdin), limits=limits)
        _check_started(r)
        out.append(r.status == "ok" and r.returncode == 0 and not r.truncated
                   and _normalise_output(r.stdout) == _normalise_output(str(expected)))
    return out


def code_tests(completions: Sequence[Any], tests: list[Any], mode: str = "fraction", timeout: float = 5.0,
               memory_mb: int = 512, unfenced: bool = False, **_) -> list[float | None]:
    """Fraction of the row's tests the completion's code passes (`mode: all` for all-or-nothing). `unfenced: true`
    takes a completion without a code fence whole as the program."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
    limits = Limits(wall_seconds=timeout, cpu_seconds=max(1, math.ceil(timeout)), memory_mb=memory_mb)
    scores: list[float | None] = []
    for text, t in zip(completion_texts(completions), tests, strict=True):
        spec = parse_tests(t)
        if spec is None:
            scores.append(None)
            continue
        code = extract_code(text, unfenced)
        if code is None:
            scores.append(0.0)
            continue
        run = _run_asserts if "asserts" in spec else _run_calls if "fn_name" in spec else _run_io
        passed = run(code, spec, limits)
        frac = sum(passed) / len(passed)
        scores.append(frac if mode == "fraction" else float(frac == 1.0))
    return scores


code_tests.columns = ("tests",)
