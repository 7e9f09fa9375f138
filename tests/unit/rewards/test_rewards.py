import json
import math
import sys
import time

import pytest

from rewards import BoundReward, get_reward, required_columns
from rewards.format import number_only, think_answer
from rewards.math import accuracy, extract_answer
from rewards.runner import Reward, build_rewards, check_columns, score

pytestmark = pytest.mark.unit


class Spec:
    def __init__(self, name, weight=1.0, args=None):
        self.name, self.weight, self.args = name, weight, args or {}


@pytest.mark.parametrize("text, gold, mode, expected", [
    ("The answer is 42", "42", "last_number", 1.0),
    ("3 + 4 = 7", "7", "last_number", 1.0),
    ("3 + 4 = 7.", "7", "last_number", 1.0),
    ("-9 + 1 = -8", "-8", "last_number", 1.0),
    ("It is -8, no wait, 8", "-8", "last_number", 0.0),
    ("1,234", "1234", "last_number", 1.0),
    ("0.50", "0.5", "last_number", 1.0),
    ("no number here", "3", "last_number", 0.0),
    ("", "3", "last_number", 0.0),
    ("so \\boxed{7}", "7", "boxed", 1.0),
    ("so \\boxed{\\frac{1}{2}}", "0.5", "boxed", 1.0),
    ("first \\boxed{3} then \\boxed{7}", "7", "boxed", 0.0),  # hedging between candidates
    ("\\boxed{7} and again \\boxed{7}", "7", "boxed", 1.0),
    ("the answer is 7 but I will not box it", "7", "boxed", 0.0),  # prose only, box required
    ("\\boxed{7", "7", "boxed", 0.0),  # cut before the box closed
    ("work\n7", "7", "final_line", 1.0),
    ("7\nmore words", "7", "final_line", 0.0),
])
def test_accuracy_table(text, gold, mode, expected):
    assert accuracy([text], answer=[gold], extract=mode) == [expected]


def test_unparseable_gold_is_not_applicable():
    assert accuracy(["5"], answer=["\\frac{"]) == [None]


def test_huge_integers_do_not_crash():
    big = "9" * 5000
    assert accuracy([big], answer=[big]) == [1.0]
    assert accuracy(["9" * 4999 + "8"], answer=[big]) == [0.0]


def test_hostile_input_is_linear_time():
    hostile = ["1" * 100_000, "-" * 100_000 + "1", "<think>" * 20_000, "\\boxed{" * 20_000, " " * 100_000,
               "\\boxed{" * 20_000 + "}" * 20_000, "{" * 50_000 + "}" * 50_000]
    t0 = time.perf_counter()
    for fn in (lambda c: accuracy(c, answer=["1"] * len(c)), lambda c: accuracy(c, ["1"] * len(c), extract="boxed"),
               think_answer, number_only):
        out = fn(hostile)
        assert all(v is None or math.isfinite(v) for v in out)
    assert time.perf_counter() - t0 < 5  # linear: well under 1 s anywhere; a quadratic scan of 100k: minutes


def test_empty_and_whitespace_completions_score_finite():
    for fn, kw in ((accuracy, {"answer": ["1"] * 4}), (think_answer, {}), (number_only, {})):
        assert all(v == 0.0 for v in fn(["", " ", "\n", "<think></think>"], **kw))


def test_format_rewards():
    assert think_answer(["<think>a</think><answer>1</answer>", "<think>a</think>", "<answer>1</answer>",
                         "<think>a</think><answer>1</answer><answer>2</answer>"]) == [1.0, 0.0, 0.0, 0.0]
    assert number_only(["42", " -3 ", "42 apples", "x"]) == [1.0, 1.0, 0.0, 0.0]


def test_extract_modes():
    assert extract_answer("a 1 b 2", "last_number") == "2"
    with pytest.raises(ValueError):
        extract_answer("x", "nope")


def test_registry_and_columns():
    assert get_reward("accuracy") is accuracy
    assert required_columns(accuracy) == ("answer",)
    assert get_reward("rewards.format:number_only") is number_only
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_build_rewards_rejects_bad_args():
    with pytest.raises(ValueError, match=r"rewards\[0\] \(accuracy\).*extract"):
        build_rewards([Spec("accuracy", args={"extract": "everything"})])
    with pytest.raises(ValueError, match="unknown reward"):
        build_rewards([Spec("acuracy")])


def test_missing_column_is_reported():
    rs = build_rewards([Spec("accuracy")])
    with pytest.raises(ValueError, match=r"needs column\(s\) \['answer'\]"):
        check_columns(rs, ["question"])


def _boom(completions, **_):
    raise RuntimeError("checker bug")


def _half(completions, **_):
    return [None if i % 2 else 0.5 for i in range(len(completions))]


def test_runner_keeps_errors_apart_from_zeros(monkeypatch):
    mod = sys.modules[__name__]
    rs = build_rewards([Spec("accuracy", 1.0), Spec(f"{mod.__name__}:_half", 2.0)])
    s = score(rs, ["7", "8"], {"answer": ["7", "7"]})
    assert s.per_reward["accuracy"] == [1.0, 0.0]
    assert s.per_reward[f"{mod.__name__}:_half"][0] == 0.5 and math.isnan(s.per_reward[f"{mod.__name__}:_half"][1])
    assert s.total == [2.0, 0.0]  # not-applicable contributes nothing, it is not an error
    assert s.errors == {"accuracy": 0, f"{mod.__name__}:_half": 0}

    monkeypatch.setitem(__import__("rewards").REGISTRY, "boom", _boom)
    rs = [r for r in build_rewards([Spec("accuracy")])] + [Reward("boom", BoundReward(f"{mod.__name__}:_boom"), 1.0)]
    s = score(rs, ["7", "8"], {"answer": ["7", "7"]})
    assert s.errors["boom"] == 2
    assert all(math.isnan(t) for t in s.total)
    assert "checker bug" in s.error_messages[0]


HOSTILE = ["<answer>" * 8000, "<think>" * 9000 + "</think>", "```\n" * 16000, "```python\n" * 6000,
           "\\boxed{" * 9000, "1" * 64_000, "Step 1:" * 9000, "a b " * 16000, "<answer>1" * 7000 + "</answer>",
           "{" * 32_000 + "}" * 32_000, "= " * 32_000, "\n-" * 32_000]


def test_every_reward_is_bounded_on_hostile_input():
    """Each shipped reward (but the sandboxed code run, whose extraction is timed directly) on 64k-character inputs
    built to make backtracking regexes quadratic: under 2 s each, finite scores or None. countdown and reasoning_gym
    took 2 s on one unclosed-tag input alone before their extraction was made linear."""
    import types

    from rewards import REGISTRY
    from rewards.code import extract_code
    from rewards.runner import build_rewards, score

    args = {"soft_overlong": {"max_tokens": 100, "buffer": 20}, "cosine_length": {"max_tokens": 100}}
    meta = json.dumps({"numbers": [1, 2], "target": 3, "source_dataset": "basic_arithmetic",
                       "source_index": 0})
    n = len(HOSTILE)
    cols = {"answer": ["3"] * n, "metadata": [meta] * n, "question": ["1 + 2 ="] * n, "num_tokens": [50] * n,
            "finish_reason": ["length"] * n, "completion_ids": [[1, 2]] * n, "prompts": ["q"] * n}
    for name in REGISTRY:
        if name == "code_tests":
            continue
        spec = types.SimpleNamespace(name=name, weight=1.0, args=args.get(name, {}))
        t0 = time.perf_counter()
        s = score(build_rewards([spec]), HOSTILE, cols)
        took = time.perf_counter() - t0
        # linear work on these inputs takes milliseconds on any CPU; the quadratic regexes they are built against
        # take seconds to minutes (64k characters squared): 2 s separates the two on a 2x slower or loaded machine
        assert took < 2.0, f"{name}: {took:.2f} s on hostile input"
        assert all(v is None or math.isnan(v) or math.isfinite(v) for v in s.per_reward[name]), name
    t0 = time.perf_counter()
    for text in HOSTILE:
        extract_code(text)
        extract_code(text, unfenced=True)
    assert time.perf_counter() - t0 < 2.0, "code extraction"


def test_last_answer_tag_agrees_with_the_regex():
    """The linear scan against the regex it replaces, on random strings over the tag alphabet."""
    import random
    import re

    from rewards.shaping import last_answer_tag

    rx = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "x", "<", "answer>", "</", "\n", "<answer></answer>"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = rx.findall(text)
        assert last_answer_tag(text) == (found[-1] if found else None), text


def test_missing_bubblewrap_refuses(monkeypatch):
    """Without bubblewrap the sandbox refuses to run code (tests/integration/test_sandbox.py runs it for real)."""
    import shutil

    from rewards.sandbox import SandboxUnavailable, check_available

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("GRPO_UNSAFE_NO_SANDBOX", raising=False)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        check_available()
