"""`grpo sft`: TRL's data formats tokenized as `grpo train` renders prompts, bad rows named at start-up, the loss
equal to transformers' own cross-entropy on the completion tokens, and a real run that learns, exports and
resumes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from grpo.config import ConfigError, load_config
from tests.helpers import RECIPE, ROOT, metrics, tiny_overrides

SYSTEM = {"role": "system", "content": "Answer with the final number only."}


def _rows(n: int = 12) -> list[dict]:
    return [{"prompt": [SYSTEM, {"role": "user", "content": f"Calculate {i} + 1."}],
             "completion": [{"role": "assistant", "content": str(i + 1)}]} for i in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.unit
def test_formats_tokenize_like_training_prompts(tokenizer):
    """A conversational prompt's ids are those `grpo train` samples from (grpo.data.render with the same
    messages); the completion is the assistant's text and the end-of-turn token, nothing after it. Text
    prompts get EOS after the completion; `messages` takes its last (assistant) turn as the completion."""
    from grpo.data import render
    from grpo.loop.sft import tokenize_row

    cfg = load_config(RECIPE, [])
    row = _rows(1)[0]
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

    rows = _rows(6)
    rows[2]["completion"] = ""  # a text completion after a conversational prompt renders to the end-of-turn only
    rows[4]["completion"] = [{"role": "assistant", "content": "9 " * 300}]
    data = _write(tmp_path / "d.jsonl", rows)
    long = r"rows longer than sft.max_length=200 \(prompt \+ completion\): 4 \(\d+ tokens\);"
    with pytest.raises(ConfigError, match=long):
        load_examples(load_config(RECIPE, [f"sft.data={data}", "sft.max_length=200"]), tokenizer)
    text = _write(tmp_path / "t.jsonl", [{"prompt": "1 + 1 =", "completion": "2"}, {"prompt": "x", "completion": ""}])
    ex = load_examples(load_config(RECIPE, [f"sft.data={text}"]), tokenizer)
    assert [len(e.completion_ids) for e in ex] == [2, 1]  # "2" + EOS; "" + EOS: EOS is still a target
    with pytest.raises(ConfigError, match="sft.data: .*missing.jsonl is neither a save_to_disk folder"):
        load_examples(load_config(RECIPE, [f"sft.data={tmp_path / 'missing.jsonl'}"]), tokenizer)
    assert tokenizer("")["input_ids"] == []  # SmolLM2 adds no BOS: an empty text prompt has no tokens at all
    blank = _write(tmp_path / "b.jsonl", [{"prompt": "1 + 1 =", "completion": "2"}, {"prompt": "", "completion": "2"}])
    with pytest.raises(ConfigError, match="rows whose prompt has no tokens .*: 1$"):
        load_examples(load_config(RECIPE, [f"sft.data={blank}"]), tokenizer)
    empty = _write(tmp_path / "e.jsonl", [{"prompt": [SYSTEM], "completion": []}])
    with pytest.raises(ConfigError, match="completion"):
        load_examples(load_config(RECIPE, [f"sft.data={empty}"]), tokenizer)


LOSS_SCRIPT = r"""
import json, os, socket, sys
sys.path.insert(0, {root!r})
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import torch
from grpo.config import load_config
from grpo.runtime.deepspeed_setup import build_policy_engine, init_distributed
from grpo.runtime.model import load_model, load_tokenizer
from grpo.loop.sft import SFTShape, load_examples, sft_step
model_dir, data = sys.argv[1], sys.argv[2]
tok = load_tokenizer(model_dir)
cfg = load_config({recipe!r}, ["sft.data=" + data, "model.path=" + model_dir, "optim.micro_batch_size=4"])
ex = load_examples(cfg, tok)
init_distributed("cpu")
ref = load_model(model_dir, "float32")
want, n = 0.0, 0
with torch.no_grad():
    for e in ex:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        labels = ids.clone()
        labels[0, : len(e.prompt_ids)] = -100
        k = len(e.completion_ids)
        want += float(ref(input_ids=ids, labels=labels).loss) * k
        n += k
engine = build_policy_engine(load_model(model_dir, "float32"), cfg, 4, 2)
rec = sft_step(engine, ex, SFTShape(6, 4, 2, 1), 1, tok.pad_token_id, 3)  # chunks of 3 tokens in the head
print("RESULT", json.dumps({{"rec": rec, "want": want / n, "n": n,
                            "all": sum(len(e.prompt_ids) + len(e.completion_ids) for e in ex)}}))
"""


@pytest.mark.integration
def test_loss_is_transformers_cross_entropy_on_completions(tmp_path, tiny_model_dir):
    """The packed, chunked loss of one step (two micro-batches) equals transformers' own loss (labels -100 on the
    prompt tokens), taken one sequence at a time, weighted by completion tokens: an independent route."""
    data = _write(tmp_path / "d.jsonl", _rows(6))
    script = tmp_path / "loss.py"
    script.write_text(LOSS_SCRIPT.format(root=str(ROOT), recipe=str(RECIPE)))
    p = subprocess.run([sys.executable, str(script), str(tiny_model_dir), data], capture_output=True, text=True,
                       timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    got = json.loads(line[0][len("RESULT "):])
    rec = got["rec"]
    assert rec["completion_tokens"] == got["n"] and rec["tokens"] == got["all"]
    assert math.isclose(rec["loss"], got["want"], rel_tol=1e-5), (rec["loss"], got["want"])
    assert rec["grad_norm"] > 0


def _sft(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    import os

    return subprocess.run([sys.executable, "-m", "grpo", "sft", str(RECIPE), *args], cwd=ROOT, env={**os.environ,
                          **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_sft_run_learns_exports_and_resumes(tmp_path, tiny_model_dir):
    """Two epochs over 12 rows (6 steps of 4) on the tiny model, every answer the same (learnable in a few
    steps): the loss falls, final/ loads, a second command with more epochs resumes from the checkpoint instead
    of starting over; a changed batch size is refused by name."""
    rows = _rows(12)
    for r in rows:
        r["completion"][0]["content"] = "42"
    data = _write(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    base = tiny_overrides(tiny_model_dir, run, **{"sft.data": data, "sft.batch_size": 4, "sft.epochs": 2,
                                                 "optim.lr": 1e-2, "checkpoint.every": 2})
    p = _sft(base)
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert m[-1]["loss"] < m[0]["loss"] - 1.0, [r["loss"] for r in m]  # nats per token
    assert all(r["tokens_per_second"] > 0 and r["completion_tokens"] > 0 for r in m)
    from grpo.runtime.model import load_model

    assert load_model(str(run / "final"), "float32") is not None
    p = _sft(base + ["sft.epochs=3"])
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, 10))
    p = _sft(base + ["sft.batch_size=6"])
    assert p.returncode == 2 and "different sft.batch_size" in p.stderr, p.stderr[-2000:]
