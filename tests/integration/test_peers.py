"""Other projects' published reward test cases, with their expected values, against our rewards; the calling
convention of TRL (keywords, conversational completions, factories) end to end, in a real run of the embedded model.
(The issue's cases and the calling convention in-process: tests/unit/rewards/test_peers.py.)

Every disagreement with a peer is either fixed or listed in DIFFERENCES with its reason (and in docs/rewards.md). The
test fails when a listed difference goes away (update the list) or a new one appears."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from tests import peer_cases
from tests.helpers import RewardSpec

# origin -> why we differ (deliberately). Keep docs/rewards.md's list in step.
DIFFERENCES = {
    "tests/test_all.py::test_number_extraction (line 71)":
        "'1,22' is a list of two numbers for us (commas separate values or thousands, never decimals)",
    "tests/test_all.py::test_latex_notation (line 132)":
        "'Answer $ \\n 9 \\n $' states 9: we read it (Math-Verify's LaTeX parser refuses math over several lines)",
    "tests/test_all.py::test_latex_notation (line 133)": "as above, with \\( \\)",
    "tests/test_all.py::test_latex_notation_math (line 205)":
        "'\\boxed{12 $ and $13 }' holds two candidates in one box against a gold that parses to one value: a hedge",
    "tests/test_all.py::test_math_extraction_additional_cases (line 810)":
        "two different boxes (200 and 255) before the final answer: several boxes are a hedge",
    "tests/test_open_thoughts.py::test_open_thoughts (line 44)":
        "a gold math-verify cannot parse (it only returns the raw text) is not applicable (None), not compared as text",
    "huggingface/open-r1:tests/test_rewards.py::TestRewards::test_unparseable_solution (line 278) #0":
        "len_reward: an unparseable gold is not applicable (None); open-r1 counts it as a right answer",
    "huggingface/open-r1:tests/test_rewards.py::TestRewards::test_unparseable_solution (line 278) #1": "as above",
}


@pytest.fixture(scope="module")
def table():
    return peer_cases.agreement()


@pytest.mark.integration  # ~500 peer cases through math-verify: seconds, shared with the next test
def test_peer_agreement_is_at_least_97_percent_and_every_difference_is_listed(table):
    diffs = {r["origin"] for r in table if not r["agree"]}
    assert diffs == set(DIFFERENCES), (sorted(diffs - set(DIFFERENCES)), sorted(set(DIFFERENCES) - diffs))
    assert sum(r["agree"] for r in table) / len(table) >= 0.97
    assert {r["peer"] for r in table} == {"Math-Verify", "trl", "open-r1", "verl"}
    assert len(table) > 400


@pytest.mark.integration
def test_no_wrong_answer_is_paid(table):
    """Where a peer says the answer is wrong, we never pay 1.0, except the two cases where the completion states the
    gold value and Math-Verify only refuses its layout (listed above)."""
    paid = {r["origin"] for r in table if r["reward"] in ("accuracy", "accuracy_reward")
            and r["expected"] == 0.0 and r["got"] == 1.0}
    assert paid == {o for o in DIFFERENCES if "test_latex_notation (line 13" in o}


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (scripts/system-deps.sh)")
@pytest.mark.integration
@pytest.mark.root
def test_verl_code_cases():
    """verl's prime_code and Sandbox Fusion cases through code_tests, in our sandbox. verl returns per-test lists
    (True, or a negative error code); our score is the fraction passed."""
    seen = 0
    for case in peer_cases.load("verl_code.jsonl"):
        if case.get("duplicate_of") or case.get("extra", {}).get("language", "python") != "python":
            continue
        want = case["expected"]
        if isinstance(want, list) and want.count(-3) > 3:
            continue  # 100 identical timeouts: the one-timeout cases cover it in a tenth of the time
        if "invalid_input_format" in case["origin"] or "input_output_mismatch" in case["origin"]:
            if case["tests"] in (None, {}):
                assert peer_cases.verl_code_case(case) is None  # nothing to check: not applicable (verl: -1)
            else:
                with pytest.raises(ValueError, match="tests: "):  # a malformed test is an error, never a 0
                    peer_cases.verl_code_case(case)
            seen += 1
            continue
        got = peer_cases.code_tests([case["completion"]], [case["tests"]], unfenced=True, timeout=2)[0]
        if isinstance(want, list):
            expected = sum(v is True for v in want) / len(want)
        else:  # verl's continuous prime_code score: it grades only the first 10 tests after a failure
            tests = case["tests"]["inputs"]
            expected = 1.0 if want == 1.0 else (len(tests) - round((1 - want) * 10)) / len(tests)
        assert got == pytest.approx(expected), case["origin"]
        seen += 1
    assert seen >= 10


# ------------------------------------------------------------------------------------------------ the list

@pytest.mark.integration  # waits out math-verify's own timeout (5 s)
def test_math_timeouts_are_errors_never_zeros():
    """math-verify swallows its own timeouts into an empty parse or a False; ours propagate to the runner."""
    from rewards.runner import build_rewards, score

    rs = build_rewards([RewardSpec("accuracy", args={"extract": "boxed"})])
    s = score(rs, ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{5}"], {"answer": ["5", "5"]})
    assert s.errors["accuracy"] == 2 and math.isnan(s.total[0])  # the in-process call covers the whole batch


# ------------------------------------------------------------------------------------------------ calling convention

@pytest.mark.parametrize("name", ["bad_length", "not_a_number", "raises"])
@pytest.mark.integration
def test_a_broken_reward_is_an_error_never_a_zero(name, tmp_path):
    from rewards.pool import WorkerPool
    from rewards.runner import build_rewards, score

    rs = build_rewards([RewardSpec("accuracy"), RewardSpec(f"tests.helpers.{name}")])
    for pool in (None, WorkerPool(1)):
        try:
            s = score(rs, ["7", "8"], {"answer": ["7", "7"]}, pool)
        finally:
            if pool is not None:
                pool.close()
        assert s.errors[f"tests.helpers.{name}"] == 2
        assert all(math.isnan(v) for v in s.per_reward[f"tests.helpers.{name}"])
        assert all(math.isnan(t) for t in s.total)


@pytest.mark.integration
def test_batched_reward_sees_each_group_alone():
    from rewards.pool import WorkerPool
    from rewards.runner import build_rewards, score

    rs = build_rewards([RewardSpec("len_reward")])
    comps, cols = ["7", "7", "7", "7"], {"answer": ["7"] * 4, "num_tokens": [10, 30, 100, 100]}
    pool = WorkerPool(1)
    try:
        for p in (None, pool):
            # group 1: lengths 10, 30 -> 0.5, -0.5; group 2: equal lengths -> 0, 0
            assert score(rs, comps, cols, p, group_size=2).per_reward["len_reward"] == [0.5, -0.5, 0.0, 0.0]
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------------ a real run

@pytest.mark.slow
@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.integration
def test_trl_and_user_rewards_in_a_real_run(tmp_path, conversational):
    """The embedded model, one step, scored by TRL's published rewards (by name; one built by its factory) and a
    user's open-r1-style file. Every recorded score is recomputed through TRL's own functions (and by hand) from the
    recorded completion."""
    from trl.rewards import accuracy_reward, think_format_reward

    from tests.helpers import run_cli

    qs = [("What is 2+3? Put the answer in \\boxed{}.", "5"), ("What is 4+4?", "8"), ("Say hello.", "hello there")]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": q}] if conversational else q,
                                          "solution": s}) for q, s in qs * 4))
    run = tmp_path / "run"
    rewards = ("[{name: trl.rewards.accuracy_reward}, {name: trl.rewards.think_format_reward, weight: 0.1}, "
               "{name: trl.rewards.get_soft_overlong_punishment, init: {max_completion_len: 10, soft_punish_cache: 4}},"
               " {name: tests.data.user_rewards.prompt_length_mod7, weight: 0.0}]")
    p = run_cli([f"output_dir={run}", "steps=1", "data.source=hf", f"data.path={data}", "data.prompt_column=prompt",
                 "data.answer_column=solution", "data.num_eval=0", "data.system_prompt=null",
                 "rollout.prompts_per_step=3", "rollout.num_generations=2", "rollout.max_new_tokens=10",
                 "optim.micro_batch_size=6", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
                 f"rewards={rewards}"], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    roll = pd.read_parquet(run / "rollouts" / "step-000001.parquet")
    assert len(roll) == 6
    gold = dict(qs)

    def trl_says(fn, completion, **kw):
        """TRL's own function on the completion in the data set's format (it raises on plain strings, as in TRL)."""
        given = [[{"role": "assistant", "content": completion}]] if conversational else [completion]
        try:
            v = fn(given, **kw)[0]
        except Exception:  # noqa: BLE001
            return math.nan
        return math.nan if v is None else v

    for _, r in roll.iterrows():
        for fn, kw in ((accuracy_reward, {"solution": [r["answer"]]}), (think_format_reward, {})):
            want, got = trl_says(fn, r["completion"], **kw), r[f"reward/trl.rewards.{fn.__name__}"]
            assert (math.isnan(want) and math.isnan(got)) or want == got, (fn.__name__, r["completion"])
        n = r["num_tokens"]  # completion_ids reached the reward: tokens, not characters
        assert r["reward/trl.rewards.get_soft_overlong_punishment"] == (0.0 if n <= 6 else (6 - n) / 4 if n <= 10
                                                                        else -1.0)
        question = next(q for q in gold if q in r["prompt"])
        assert r["reward/tests.data.user_rewards.prompt_length_mod7"] == float(len(question) % 7 if conversational
                                                                              else len(r["prompt"]) % 7)
    if not conversational:  # TRL's math rewards index messages: on plain text they fail, counted, never a 0
        assert roll["reward_error"].all()
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])[
            "reward/trl.rewards.accuracy_reward/errors"] == 6
        return
    assert roll.loc[roll["answer"] == "hello there", "reward/trl.rewards.accuracy_reward"].isna().all()
