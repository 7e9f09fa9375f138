"""`grpo distill`, real runs: a local teacher with a crash in the middle and a resume, the result read by `grpo sft`;
a local model sampled in-process; and a real `vllm serve` teacher through its OpenAI-compatible API. (The client
and the selection by hand: tests/unit/loop/test_distill.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grpo.config import load_config
from tests.helpers import RECIPE, ROOT, chat_completion, scripted_endpoint, tiny_overrides


def _distill(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "grpo", "distill", str(RECIPE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_endpoint_teacher_crash_loses_nothing_then_resumes(tmp_path, tiny_model_dir):
    """An endpoint that answers the first batch and then goes down: the run stops with its URL and the reason,
    exit 1, the first batch kept on disk; the rerun (endpoint back) asks only for the rest. Each prompt gets its
    gold answer and a wrong one, so exactly half the samples pass `accuracy`."""
    from grpo.data import load_rows

    out = tmp_path / "run"
    rows, _ = load_rows(load_config(RECIPE, tiny_overrides(tiny_model_dir, out)).data)
    gold = {r["question"]: r["answer"] for r in rows}

    def script(i, body):
        return (200, chat_completion([f"The answer is {gold[body['messages'][-1]['content']]}", "no idea"]), {})

    args = tiny_overrides(tiny_model_dir, out, **{"distill.num_prompts": 8, "distill.batch_prompts": 4,
                                                  "distill.num_samples": 2, "distill.teacher.retries": 1,
                                                  "distill.teacher.backoff": 0.01, "distill.teacher.model": "t",
                                                  "rewards": "[{name: accuracy}]"})
    with scripted_endpoint(script) as (url, seen):
        calls = {"n": 0}

        def flaky(i, body):  # answers the first four requests, then is down for maintenance
            calls["n"] += 1
            return script(i, body) if calls["n"] <= 4 else (503, "maintenance", {})

        with scripted_endpoint(flaky) as (url2, _):
            p = _distill([*args, f"distill.teacher.url={url2}", "distill.teacher.concurrency=1"])
        assert p.returncode == 1, p.stderr[-3000:]
        assert f"teacher t @ {url2}: every request of a batch failed" in p.stderr and "answered 503" in p.stderr
        assert "Traceback" not in p.stderr
        shards = sorted((out / "distilled.shards").glob("shard-*.jsonl"))
        assert len(shards) == 1 and len(shards[0].read_text().splitlines()) == 8  # 4 prompts x 2 samples
        p = _distill([*args, f"distill.teacher.url={url}"])
        assert p.returncode == 0, p.stderr[-3000:]
        assert "4 prompts already in" in p.stderr
        assert len(seen) == 4  # only the other four prompts were asked for
    report = json.loads((out / "distilled" / "report.json").read_text())
    assert report["prompts"] == 8 and report["samples"] == 16 and report["passed"] == 8 and report["kept"] == 8
    import datasets

    ds = datasets.load_from_disk(str(out / "distilled"))
    assert set(ds.column_names) >= {"prompt", "completion", "prompt_id", "teacher", "sampling", "rewards", "total"}
    assert all(json.loads(r)["accuracy"] == 1.0 for r in ds["rewards"])
    assert len(ds) == 8 and (out / "distilled" / "data.parquet").is_file()
    from grpo.loop.sft import load_examples
    from grpo.runtime.model import load_tokenizer

    cfg = load_config(RECIPE, [f"sft.data={out / 'distilled'}"])
    ex = load_examples(cfg, load_tokenizer(str(tiny_model_dir)))
    assert len(ex) == 8


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_local_teacher_in_process(tmp_path, request, engine):
    """A local model sampled in-process (the HF engine, or vLLM's colocated engine), threshold 0 so every sample
    passes: N per prompt, `shortest` keeps one per prompt, in TRL's conversational format."""
    model = request.getfixturevalue("tiny_model_dir" if engine == "hf" else "vllm_tiny_dir")
    out = tmp_path / "run"
    settings = {"distill.num_prompts": 3, "distill.num_samples": 3, "distill.teacher.model": str(model),
                "rollout.engine": engine, "distill.threshold": 0.0, "rewards": "[{name: accuracy}]"}
    p = _distill(tiny_overrides(model, out, **settings, **{"distill.keep": "shortest"}))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "distilled" / "report.json").read_text())
    assert (report["prompts"], report["samples"], report["passed"], report["kept"]) == (3, 9, 9, 3)
    assert report["teacher"] == str(model)
    import datasets

    rows = datasets.load_from_disk(str(out / "distilled"))
    assert len(rows) == 3 and all(r["completion"][0]["role"] == "assistant" for r in rows)
    if engine == "hf":  # a rerun with every prompt on disk (here: to keep all) rebuilds the data set, no teacher
        p = _distill(tiny_overrides(model, out, **settings, **{"distill.keep": "all"}))
        assert p.returncode == 0, p.stderr[-3000:]
        report = json.loads((out / "distilled" / "report.json").read_text())
        assert (report["samples"], report["kept"], report["teacher"]) == (9, 9, str(model))


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serve_teacher_through_the_openai_api(tmp_path, vllm_tiny_dir, vllm_server):
    """A real `vllm serve` (grpo serve, the session's) as the teacher, through its OpenAI-compatible
    /v1/chat/completions."""
    url = vllm_server
    out = tmp_path / "run"
    p = _distill(tiny_overrides(vllm_tiny_dir, out, **{"distill.num_prompts": 4, "distill.num_samples": 2,
                                                       "distill.teacher.url": f"{url}/v1",
                                                       "distill.teacher.model": str(vllm_tiny_dir),
                                                       "distill.threshold": 0.0,
                                                       "rewards": "[{name: accuracy}]"}))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "distilled" / "report.json").read_text())
    assert (report["prompts"], report["samples"], report["failed_requests"]) == (4, 8, 0)
    assert report["sampled_tokens"] > 0
