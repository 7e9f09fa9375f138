"""The shaping rewards, by hand. (Killable scoring workers, math checks that explode, the runner's bookkeeping and
`grpo check-rewards`: tests/integration/test_scoring.py.)"""

from __future__ import annotations

import json

import pytest

from rewards.shaping import (
    cosine_length,
    countdown,
    reasoning_gym_verifier,
    repetition_penalty,
    soft_overlong,
    tag_count,
)


@pytest.mark.unit
def test_tag_count():
    assert tag_count(["<think>x</think><answer>1</answer>", "<think><think>", "", "</answer>"]) == [1.0, 0.0, 0.0,
                                                                                                   0.25]


@pytest.mark.unit
def test_soft_overlong_by_hand():
    assert soft_overlong(["a"] * 5, num_tokens=[10, 12, 14, 16, 17], max_tokens=16, buffer=4) == pytest.approx(
        [0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError):
        soft_overlong([], num_tokens=[], max_tokens=4, buffer=5)


@pytest.mark.unit
def test_cosine_length_by_hand():
    got = cosine_length(["7", "7", "8", "8", "7"], answer=["7", "7", "7", "7", "x{"], num_tokens=[0, 100, 0, 100, 5],
                        max_tokens=100)
    assert got[:4] == pytest.approx([1.0, 0.5, -0.5, 0.0])
    mid = cosine_length(["7"], answer=["7"], num_tokens=[50], max_tokens=100)[0]
    assert mid == pytest.approx(0.75)
    assert got[4] is None


@pytest.mark.unit
def test_repetition_penalty_by_hand():
    # 6 words -> 4 trigrams, of which ("a","b","c") twice: 3 unique of 4
    assert repetition_penalty(["a b c a b c"], ngram=3) == pytest.approx([-(1 - 3 / 4)])
    assert repetition_penalty(["one two"], ngram=3) == [0.0]
    assert repetition_penalty(["x " * 100], ngram=2, max_penalty=-0.5)[0] == pytest.approx(-0.5 * (1 - 1 / 99))


@pytest.mark.unit
def test_countdown():
    meta = json.dumps({"numbers": [66, 34, 98, 54, 6], "target": 164})
    comps = ["<answer>6*(98 - 54) - 34 - 66</answer>", "<answer>6*(98-54)-34-66-0</answer>",
             "<answer>164</answer>", "6*(98 - 54) - 34 - 66 = 164", "<answer>66*66</answer>",
             "<answer>__import__('os')</answer>", "<answer>2**100</answer>"]
    assert countdown(comps, metadata=[meta] * len(comps)) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert countdown(["1"], metadata=["{}"]) == [None]


@pytest.mark.unit
def test_reasoning_gym_adapter_uses_the_tasks_own_scorer():
    import reasoning_gym

    x = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    meta = json.dumps(x["metadata"])
    good = f"<think>...</think><answer>{x['answer']}</answer>"
    got = reasoning_gym_verifier([good, "<answer>1+1</answer>", "no tags"], question=[x["question"]] * 3,
                                 answer=[x["answer"]] * 3, metadata=[meta] * 3)
    assert got[0] == 1.0 and got[1] < 1.0 and got[2] == 0.0
