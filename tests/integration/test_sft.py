"""`grpo sft`: the loss equal to transformers' own cross-entropy on the completion tokens, and a real run that
learns, exports and resumes. (Tokenization and bad rows: tests/unit/loop/test_sft.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import RECIPE, ROOT, metrics, sft_rows, tiny_overrides, write_jsonl

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
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(6))
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
    rows = sft_rows(12)
    for r in rows:
        r["completion"][0]["content"] = "42"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
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
