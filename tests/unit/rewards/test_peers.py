"""Our rewards on the cases of the peers' issue list, TRL's calling convention (keywords, conversational
completions, factories) and conversational data, in-process. (The peers' published test cases, with DIFFERENCES,
and TRL's rewards in a real run of the embedded model: tests/integration/test_peers.py.)"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import RewardSpec

# ------------------------------------------------------------------------------------------------ the issue's list

@pytest.mark.parametrize("text, gold, mode, expected", [
    ("\\boxed{3}", "3\\sqrt{13}", "boxed", 0.0),  # math-verify used to read the gold's first number
    ("\\boxed{2}", "2-2p", "boxed", 0.0),
    ("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}", "boxed", 1.0),
    ("\\boxed{\\frac12}", "0.5", "boxed", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}", "boxed", 1.0),  # was None: the sample left training
    ("\\boxed{1,2}", "12", "boxed", 0.0),  # a comma that is no thousands separator
    ("\\boxed{122}", "1,22", "boxed", 0.0),
    ("\\boxed{1,234}", "1234", "boxed", 1.0),
    ("\\boxed{12{,}000}", "12000", "boxed", 1.0),
    ("\\boxed{+33}", "33", "boxed", 1.0),
    ("\\boxed{3 \\text{ or } 5}", "3", "boxed", 0.0),  # a hedge inside one box
    ("\\boxed{3; 5}", "3", "boxed", 0.0),
    ("\\boxed{3, 5}", "3", "boxed", 0.0),
    ("\\boxed{3 \\quad 5}", "8", "boxed", 0.0),  # math-verify alone reads 3 \quad 5 as 8
    ("\\boxed{3}", "yes", "boxed", None),  # prose gold: no math check applies
    ("\\boxed{(1,2)}", "(1,2)", "boxed", 1.0),
    ("\\boxed{2} and \\boxed{3}", "2, 3", "boxed", 1.0),  # the gold lists two values: two boxes are the answer
    ("\\boxed{2} and \\boxed{3}", "3", "boxed", 0.0),
    ("so\n\\[\nx = \\frac{1}{2}\n\\]", "0.5", "final_line", 1.0),  # a display block over lines
    ("x = 10-7", "7", "last_number", 1.0),  # a minus between digits is an operator
    ("x = 10-7", "-7", "last_number", 0.0),
    # found in review: LaTeX spacing is no separator, the same value boxed twice is no hedge, units
    ("\\boxed{5\\,\\text{cm}}", "5", "boxed", 1.0),
    ("\\boxed{5\\;\\text{cm}}", "5", "boxed", 1.0),
    ("\\boxed{50\\,\\%}", "50", "boxed", 1.0),
    ("\\boxed{5\\quad\\text{dollars}}", "5", "boxed", 1.0),
    ("\\boxed{18}. Final Answer: \\boxed{\\$18}", "18", "boxed", 1.0),
    ("\\boxed{\\frac12}, i.e. \\boxed{0.5}", "0.5", "boxed", 1.0),
    ("\\boxed{3} \\boxed{5}", "5", "boxed", 0.0),
    ("Natalia sold 72 clips altogether.", "72", "final_line", 1.0),
    ("72 clips", "72", "final_line", 1.0),
    ("\\boxed{10}", "10 cm", "boxed", 1.0),
    ("\\boxed{11}", "10 cm", "boxed", 0.0),
])
@pytest.mark.unit
def test_accuracy_cases_from_the_issue(text, gold, mode, expected):
    from rewards.math import accuracy

    assert accuracy([text], [gold], extract=mode) == [expected]


@pytest.mark.unit
def test_accuracy_options():
    from rewards.math import accuracy

    assert accuracy(["\\boxed{3.14159}"], ["\\pi"], extract="boxed", precision=2) == [1.0]
    assert accuracy(["\\boxed{3.14159}"], ["\\pi"], extract="boxed", precision=6) == [0.0]
    assert accuracy(["\\boxed{2}", "\\boxed{3}"], ["2, 3", "2, 3"], extract="boxed") == [0.0, 0.0]
    assert accuracy(["\\boxed{2}\\boxed{3}"], ["\\{2, 3\\}"], extract="boxed") == [1.0]
    assert accuracy(["\\boxed{3} \\boxed{2}"], ["7"], extract="boxed", multi_box=True) == [0.0]
    assert accuracy(["<think>\\boxed{4}", "<think>x</think> \\boxed{4}"], ["4", "4"], extract="boxed",
                    after="</think>") == [0.0, 1.0]
    with pytest.raises(ValueError, match="precision"):
        accuracy([], [], precision=-1)


@pytest.mark.unit
def test_hostile_inputs_stay_linear():
    import time

    from rewards.format import number_only
    from rewards.math import accuracy

    t0 = time.perf_counter()
    assert accuracy(["\\boxed{1" + ",000" * 20000 + "}"], ["\\frac12"], extract="boxed") == [0.0]
    assert accuracy(["1" + ",000" * 20000], ["5"]) == [0.0]
    assert accuracy(["\\boxed{5" + " " * 5000 + "x}"], ["5"], extract="boxed") == [0.0]
    assert number_only(["5" + " " * 100_000 + "x"]) == [0.0]
    assert time.perf_counter() - t0 < 5  # linear: well under 1 s anywhere; a quadratic scan of 100k: minutes


@pytest.mark.unit
def test_sandbox_that_cannot_start_is_an_error(monkeypatch):
    from rewards import code
    from rewards.sandbox import RunResult

    monkeypatch.setattr(code, "run_python", lambda *a, **k: RunResult("error", None, "", "fork: EAGAIN", 0.0))
    with pytest.raises(RuntimeError, match="sandbox did not start"):
        code.code_tests(["```python\nprint(1)\n```"], [{"inputs": [""], "outputs": ["1"]}])


@pytest.mark.unit
def test_new_peer_rewards_by_hand():
    from rewards.format import code_format, think_answer
    from rewards.shaping import len_reward, reasoning_steps

    # Kimi 1.5: lengths 10, 20, 30 -> lambda 0.5, 0, -0.5; wrong answers keep only the negative part
    assert len_reward(["7", "7", "8"], ["7", "7", "7"], [10, 20, 30]) == [0.5, 0.0, -0.5]
    assert len_reward(["8", "7"], ["7", "7"], [10, 30]) == [0.0, -0.5]
    assert len_reward(["7", "8"], ["7", "7"], [5, 5]) == [0.0, 0.0]
    assert reasoning_steps(["Step 1: a\nStep 2: b", "First, a\nNext, b\nFinally, c\n- d", "none"]) == \
        [pytest.approx(2 / 3), 1.0, 0.0]
    ok = "<think>\nplan\n</think>\n<answer>\n```python\nprint(1)\n```\n</answer>"
    assert code_format([ok, ok.replace("python", "rust"), "```python\nx\n```"]) == [1.0, 0.0, 0.0]
    assert code_format([ok.replace("python", "rust")], language=["rust"]) == [1.0]
    assert think_answer(["<think>a</think>free text", "<think>a</think><think>b</think>"],
                        require_answer=False) == [1.0, 0.0]


@pytest.mark.unit
def test_completions_as_messages_score_like_text():
    from rewards import REGISTRY

    texts = ["<think>x</think><answer>\\boxed{7}</answer>", "7"]
    msgs = [[{"role": "assistant", "content": t}] for t in texts]
    for name in ("accuracy", "think_answer_format", "tag_count", "number_only_format", "reasoning_steps"):
        fn = REGISTRY[name]
        kw = {"answer": ["7", "7"]} if name == "accuracy" else {}
        assert fn(msgs, **kw) == fn(texts, **kw), name


# ------------------------------------------------------------------------------------------------ calling convention

@pytest.mark.unit
def test_rewards_are_called_by_keyword_as_trl_calls_them():
    from rewards.runner import TrainerState, build_rewards, score

    rs = build_rewards([RewardSpec("tests.data.user_rewards.prompt_length_mod7"),
                        RewardSpec("tests.data.user_rewards:starts_with_digit"),
                        RewardSpec("tests.data.user_rewards.token_count"),
                        RewardSpec("trl.rewards.get_soft_overlong_punishment",
                             init={"max_completion_len": 4, "soft_punish_cache": 2})])
    comps = [[{"role": "assistant", "content": "7 apples"}], [{"role": "assistant", "content": "no"}]]
    prompts = [[{"role": "user", "content": "abcdefghi"}], [{"role": "user", "content": "ab"}]]
    cols = {"prompts": prompts, "completion_ids": [[1, 2, 3], [4, 5, 6, 7, 8]], "solution": ["7", ""],
            "num_tokens": [3, 5], "finish_reason": ["stop", "length"]}
    s = score(rs, comps, cols, None, TrainerState(3, 10))
    assert s.per_reward["tests.data.user_rewards.prompt_length_mod7"] == [2.0, 2.0]  # 9 % 7, 2 % 7
    got = s.per_reward["tests.data.user_rewards:starts_with_digit"]
    assert got[0] == 1.0 and math.isnan(got[1])
    assert s.per_reward["tests.data.user_rewards.token_count"] == [3.0, 5.0]
    # TRL: (Lmax - cache - L) / cache = (4 - 2 - 3) / 2 for 3 tokens; -1 past Lmax
    assert s.per_reward["trl.rewards.get_soft_overlong_punishment"] == [-0.5, -1.0]


@pytest.mark.unit
def test_bad_reward_names_and_factories_fail_at_start_up():
    from rewards.runner import build_rewards

    with pytest.raises(ValueError, match=r"rewards\[0\].name: reward 'nowhere.fn': cannot import"):
        build_rewards([RewardSpec("nowhere.fn")])
    with pytest.raises(ValueError, match=r"rewards\[0\].args: .*unknown argument\(s\) \['extarct'\]"):
        build_rewards([RewardSpec("accuracy", args={"extarct": "boxed"})])
    with pytest.raises(ValueError, match="init .* does not build a reward"):
        build_rewards([RewardSpec("trl.rewards.get_soft_overlong_punishment", init={"wrong": 1})])


# ------------------------------------------------------------------------------------------------ data

@pytest.mark.unit
def test_conversational_and_folder_data(tmp_path, tokenizer):
    import datasets

    from grpo.config import ConfigError, DataConfig
    from grpo.data import load_rows, render

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1?"}],
             "solution": str(i + 1)} for i in range(6)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    cfg = DataConfig(source="hf", path=str(folder), prompt_column="prompt", answer_column="solution", num_eval=2,
                     num_train=10)
    train, held = load_rows(cfg)
    ps = render(train, cfg, tokenizer)
    assert ps.conversational and len(ps.rows) == 4 and len(held) == 2
    row = ps.rows[0]
    want = tokenizer.apply_chat_template(row["prompt_messages"], tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == want and "Be brief." in want  # the system turn is kept, not JSON-dumped
    assert "prompt" not in ps.columns and "solution" in ps.columns and "question" in ps.columns
    # a folder of jsonl files as a hub repository holds them
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    (hub / "train.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "answer": str(i)})
                                               for i in range(5)))
    train, _ = load_rows(DataConfig(source="hf", path=str(tmp_path / "hub"), num_eval=1))
    assert len(train) == 4 and not render(train, DataConfig(), tokenizer).conversational
    # a prompt that is neither text nor messages is named at start-up
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"text": "hi"}], "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match=r"row 0 column 'prompt'.*role"):
        load_rows(DataConfig(source="hf", path=str(bad), prompt_column="prompt", num_eval=0))
