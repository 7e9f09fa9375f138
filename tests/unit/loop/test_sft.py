"""`grpo sft`: TRL's data formats tokenized as `grpo train` renders prompts, and bad rows named at start-up. (The
loss and a real run: tests/integration/test_sft.py.)"""

from __future__ import annotations

import pytest

from grpo.config import ConfigError, load_config
from tests.helpers import RECIPE, SFT_SYSTEM, sft_rows, write_jsonl


@pytest.mark.unit
def test_formats_tokenize_like_training_prompts(tokenizer):
    """A conversational prompt's ids are those `grpo train` samples from (grpo.data.render with the same
    messages); the completion is the assistant's text and the end-of-turn token, nothing after it. Text
    prompts get EOS after the completion; `messages` takes its last (assistant) turn as the completion."""
    from grpo.data import render
    from grpo.loop.sft import tokenize_row

    cfg = load_config(RECIPE, [])
    row = sft_rows(1)[0]
    p, c = tokenize_row(row, 0, tokenizer)
    rendered = render([{"prompt_id": "x", "question": "Calculate 0 + 1.", "answer": "1"}], cfg.data, tokenizer)
    assert p == rendered.rows[0]["prompt_ids"]
    assert tokenizer.decode(c) == "1<|im_end|>" and c[-1] == tokenizer.eos_token_id
    p2, c2 = tokenize_row({"messages": row["prompt"] + row["completion"]}, 0, tokenizer)
    assert (p2, c2) == (p, c)
    p3, c3 = tokenize_row({"prompt": "2 + 2 =", "completion": " 4"}, 0, tokenizer)
    assert tokenizer.decode(p3) == "2 + 2 =" and c3 == tokenizer(" 4", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    with pytest.raises(ConfigError, match=r"sft.data: row 3 has neither 'prompt' and 'completion' nor 'messages'"):
        tokenize_row({"text": "x"}, 3, tokenizer)
    with pytest.raises(ConfigError, match="row 5: 'messages' must end with an assistant turn"):
        tokenize_row({"messages": row["prompt"]}, 5, tokenizer)


@pytest.mark.unit
def test_bad_rows_fail_at_start_up_by_number(tmp_path, tokenizer):
    from grpo.loop.sft import load_examples

    rows = sft_rows(6)
    rows[2]["completion"] = ""  # a text completion after a conversational prompt renders to the end-of-turn only
    rows[4]["completion"] = [{"role": "assistant", "content": "9 " * 300}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    long = r"rows longer than sft.max_length=200 \(prompt \+ completion\): 4 \(\d+ tokens\);"
    with pytest.raises(ConfigError, match=long):
        load_examples(load_config(RECIPE, [f"sft.data={data}", "sft.max_length=200"]), tokenizer)
    text = write_jsonl(tmp_path / "t.jsonl",
                       [{"prompt": "1 + 1 =", "completion": "2"}, {"prompt": "x", "completion": ""}])
    ex = load_examples(load_config(RECIPE, [f"sft.data={text}"]), tokenizer)
    assert [len(e.completion_ids) for e in ex] == [2, 1]  # "2" + EOS; "" + EOS: EOS is still a target
    with pytest.raises(ConfigError, match="sft.data: .*missing.jsonl is neither a save_to_disk folder"):
        load_examples(load_config(RECIPE, [f"sft.data={tmp_path / 'missing.jsonl'}"]), tokenizer)
    assert tokenizer("")["input_ids"] == []  # SmolLM2 adds no BOS: an empty text prompt has no tokens at all
    blank = write_jsonl(tmp_path / "b.jsonl",
                        [{"prompt": "1 + 1 =", "completion": "2"}, {"prompt": "", "completion": "2"}])
    with pytest.raises(ConfigError, match="rows whose prompt has no tokens .*: 1$"):
        load_examples(load_config(RECIPE, [f"sft.data={blank}"]), tokenizer)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": [SFT_SYSTEM], "completion": []}])
    with pytest.raises(ConfigError, match="completion"):
        load_examples(load_config(RECIPE, [f"sft.data={empty}"]), tokenizer)
