"""Killable scoring workers, math checks that explode, the runner's bookkeeping, and `grpo check-rewards`. (The
shaping rewards: tests/unit/rewards/test_scoring.py.)"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from rewards import BoundReward
from rewards.math import accuracy
from rewards.pool import WorkerPool
from rewards.runner import Reward, build_rewards, score
from tests.helpers import ROOT


def _sleep(x):
    time.sleep(x)
    return x


def _die(code):
    os._exit(code)


def _hog(mb):
    return len(bytearray(mb * 2**20))


def _raise(msg):
    raise KeyError(msg)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(workers=2, memory_mb=1024) as p:
        yield p


@pytest.mark.integration
def test_pool_keeps_order_and_separates_outcomes(pool):
    calls = [((0.01,), {}), ((30,), {}), ((0.02,), {})]
    t0 = time.monotonic()
    out = pool.map(_sleep, calls, timeout=1.5)
    # the timeout and a worker's kill and respawn (a python start importing rewards, under 1 s even on a loaded
    # 2-core machine), far below the 30 s a pool that waited out the call would take
    assert time.monotonic() - t0 < 5
    assert out[0].value == 0.01 and out[2].value == 0.02
    assert out[1].timed_out and out[1].value is None
    assert [o.value for o in pool.map(_sleep, [((0.0,), {})] * 4, timeout=5)] == [0.0] * 4  # respawned


@pytest.mark.integration
def test_pool_survives_crashes_memory_and_exceptions(pool):
    out = pool.map(_die, [((3,), {})], timeout=5)
    assert "died" in out[0].error
    out = pool.map(_hog, [((4096,), {}), ((1,), {})], timeout=10)
    assert out[0].error is not None and out[1].value == 2**20
    out = pool.map(_raise, [(("boom",), {})], timeout=5)
    assert "KeyError" in out[0].error and not out[0].timed_out


@pytest.mark.parametrize("pred", [r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{100000000!}",
                                  r"\boxed{\log(\log(\log(10^{10^{10^{10}}})))}"])
@pytest.mark.integration
def test_exploding_math_is_cut_off(pool, pred):
    t0 = time.monotonic()
    out = pool.map(accuracy, [(([pred],), {"answer": ["5"], "extract": "boxed"})], timeout=3)
    assert time.monotonic() - t0 < 8  # the timeout plus a respawn; unguarded, these take hours
    o = out[0]
    assert o.timed_out or o.error is not None or o.value == [0.0]


@pytest.mark.integration
def test_runner_with_pool_costs_only_the_hanging_sample(pool):
    rs = build_rewards([type("S", (), {"name": "accuracy", "weight": 1.0, "args": {"extract": "boxed"},
                                       "timeout": 2.0})()])
    comps = [r"\boxed{7}", r"\boxed{9^{9^{9^{9^{9^{9}}}}}}", r"\boxed{8}"]
    s = score(rs, comps, {"answer": ["7", "7", "7"]}, pool)
    assert s.per_reward["accuracy"][0] == 1.0 and s.per_reward["accuracy"][2] == 0.0
    if math.isnan(s.total[1]):  # the tower either timed out (an error, not a zero) or was refused quickly
        assert s.errors["accuracy"] == 1
    assert s.total[0] == 1.0 and s.total[2] == 0.0


@pytest.mark.integration
def test_runner_in_process_and_pooled_agree(pool):
    rs = [Reward("tag_count", BoundReward("tag_count")), Reward("rep", BoundReward("repetition_penalty"), 0.5)]
    comps = ["<think>a b c a b c</think><answer>1</answer>", "", "x y z"]
    a = score(rs, comps, {})
    b = score(rs, comps, {}, pool)
    assert a.total == pytest.approx(b.total)


LIBRARY = ("rewards=[{name: accuracy, args: {extract: boxed}}, {name: tag_count}, {name: code_tests, timeout: 20}, "
           "{name: countdown}]")


def _check(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "grpo", "check-rewards", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.integration
@pytest.mark.root
def test_shipped_reward_cases_agree():
    recipe = ROOT / "recipes" / "smollm2-135m-arith.yaml"
    p = _check(recipe, ROOT / "rewards" / "cases" / "arithmetic.jsonl")
    assert p.returncode == 0 and "all agree" in p.stdout, p.stdout + p.stderr
    p = _check(recipe, ROOT / "rewards" / "cases" / "library.jsonl", LIBRARY)
    assert p.returncode == 0 and "13 checks on 11 cases: all agree" in p.stdout, p.stdout + p.stderr


@pytest.mark.integration
def test_check_rewards_reports_disagreements(tmp_path):
    cases = tmp_path / "c.jsonl"
    cases.write_text(json.dumps({"completion": "2 + 2 = 5", "answer": "4", "expected": {"accuracy": 1.0},
                                 "note": "deliberately wrong label"}) + "\n")
    p = _check(ROOT / "recipes" / "smollm2-135m-arith.yaml", cases)
    assert p.returncode == 1
    assert "1 of 1 checks disagree" in p.stdout and "deliberately wrong label" in p.stdout
    cases.write_text("{not json\n")
    p = _check(ROOT / "recipes" / "smollm2-135m-arith.yaml", cases)
    assert p.returncode == 2 and "c.jsonl:1: not JSON" in p.stderr
