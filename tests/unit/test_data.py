import json

import pandas as pd
import pytest

from grpo.config import ConfigError, DataConfig
from grpo.data import PromptSampler, load_rows, render

pytestmark = pytest.mark.unit

ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]


@pytest.fixture(params=["jsonl", "parquet", "csv"])
def local_file(request, tmp_path):
    p = tmp_path / f"d.{request.param}"
    df = pd.DataFrame(ROWS)
    if request.param == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif request.param == "parquet":
        df.to_parquet(p)
    else:
        df.to_csv(p, index=False)
    return p


def test_local_files_load_with_held_out_split(local_file, tokenizer):
    cfg = DataConfig(source="hf", path=str(local_file), num_eval=5, num_train=100)
    train, held = load_rows(cfg)
    assert len(train) == 15 and len(held) == 5
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    ps = render(train, cfg, tokenizer)
    row = ps.rows[0]
    assert row["question"] in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["prompt_ids"]) == row["prompt"]
    assert "answer" in ps.columns
    assert str(row["answer"]) == str(int(row["question"].split()[2]) * 2)


def test_missing_column_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="column 'question' not in"):
        load_rows(DataConfig(source="hf", path=str(p), num_eval=0))


def test_empty_dataset(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question,answer\n")
    with pytest.raises(ConfigError, match="empty|cannot load"):
        load_rows(DataConfig(source="hf", path=str(p), num_eval=0))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(DataConfig(source="hf", path=str(tmp_path / "nope.jsonl")))


def test_long_prompts_are_dropped_and_reported(tokenizer, caplog):
    rows = [{"prompt_id": "short", "question": "1+1?", "answer": "2"},
            {"prompt_id": "long", "question": "word " * 500, "answer": "2"}]
    cfg = DataConfig(max_prompt_tokens=64)
    ps = render(rows, cfg, tokenizer)
    assert [r["prompt_id"] for r in ps.rows] == ["short"]
    assert ps.dropped_too_long == ["long"]
    assert "long" in caplog.text and "dropped" in caplog.text


def test_reasoning_gym_rows_and_disjoint_eval():
    cfg = DataConfig(task="basic_arithmetic", task_args={"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                         "max_digits": 1}, num_train=300, num_eval=50)
    train, held = load_rows(cfg)
    assert len(held) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert all(r["answer"].lstrip("-").isdigit() for r in train)


def test_bad_task_named():
    with pytest.raises(ConfigError, match="data.task"):
        load_rows(DataConfig(task="no_such_task"))


def test_sampler_resumes_exactly():
    a = PromptSampler(7, seed=3)
    first = a.take(5)
    state = a.state()
    rest = a.take(12)
    b = PromptSampler(7, seed=3)
    b.load_state(state)
    assert b.take(12) == rest
    assert sorted(first + rest[:2]) == list(range(7))  # an epoch is a permutation
    with pytest.raises(ConfigError, match="data changed"):
        PromptSampler(8, seed=3).load_state(state)


def test_gsm8k_style_answers_are_extracted(tmp_path, caplog):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"She has {i} apples, so\n{i} * 2 = {2 * i}\n#### {2 * i}"}
            for i in range(10)]
    rows.append({"question": "broken", "answer": "no final marker"})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="hf", path=str(p), num_eval=2, answer_pattern=r"####\s*(.+)$")
    with caplog.at_level("WARNING"):
        train, held = load_rows(cfg)
    got = {r["question"]: r["answer"] for r in train + held}
    assert got == {f"q{i}": str(2 * i) for i in range(10)}  # "broken" dropped, the rest exactly the final number
    assert "1 of 11 rows" in caplog.text
    with pytest.raises(ConfigError, match="matches no answer"):
        load_rows(DataConfig(source="hf", path=str(p), num_eval=2, answer_pattern=r"@@@(\d+)"))


@pytest.mark.parametrize("pattern,message", [("####", "needs a capture group"), ("(unclosed", "not a valid regex")])
def test_bad_answer_pattern_named(pattern, message):
    with pytest.raises(ConfigError, match=f"data.answer_pattern: .*{message}"):
        DataConfig(source="hf", path="x.jsonl", answer_pattern=pattern).validate()


def test_few_shot_examples_go_between_the_system_message_and_the_prompt(tokenizer):
    rows = [{"prompt_id": "a", "question": "1+1?", "answer": "2"}]
    shots = [{"user": "2+2?", "assistant": "4"}, {"user": "3+3?", "assistant": "6"}]
    ps = render(rows, DataConfig(system_prompt="Be brief.", few_shot=shots), tokenizer)
    assert [(m["role"], m["content"]) for m in ps.rows[0]["prompt_messages"]] == [
        ("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6"),
        ("user", "1+1?")]
    plain = render(rows, DataConfig(few_shot=shots[:1]), tokenizer).rows[0]["prompt_messages"]
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    with pytest.raises(ConfigError, match=r"data.few_shot\[0\]: needs exactly the keys user and assistant"):
        DataConfig(few_shot=[{"question": "2+2?", "assistant": "4"}])
