"""`grpo distill`: the endpoint client's retries and refusals (against a scripted local HTTP endpoint), the
selection of verified samples (by hand), and real runs: a local teacher with a crash in the middle and a resume,
the result read by `grpo sft`; and a real `vllm serve` teacher through its OpenAI-compatible API."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo.config import TeacherConfig, load_config
from grpo.rollout.base import SamplingParams
from tests.helpers import RECIPE, ROOT, tiny_overrides


def _chat(texts: list[str], finish: str = "stop") -> dict:
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish}
                        for i, t in enumerate(texts)]}


@contextlib.contextmanager
def _endpoint(script):
    """A local HTTP endpoint answering each POST with the next scripted action: (status, body, headers), or
    "drop" (close the connection without an answer). Yields (base URL, the request bodies received)."""
    seen: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                action = script(len(seen) - 1, body)
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            status, payload, headers = action
            raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()


@pytest.mark.unit
def test_endpoint_retries_what_is_worth_retrying(monkeypatch):
    from grpo.loop.distill import Tally, TeacherError, request_samples

    steps = [(429, {"error": "slow down"}, {"Retry-After": "3"}), (503, "busy", {}), "drop",
             (200, "not json", {}), (200, _chat(["only one"]), {}), (200, _chat(["a", "b"]), {})]
    waits: list[float] = []
    monkeypatch.setenv("TEACHER_KEY", "sekrit")
    with _endpoint(lambda i, body: steps[i]) as (url, seen):
        t = TeacherConfig(url=url, model="m", api_key_env="TEACHER_KEY", retries=5, backoff=0.5, timeout=10)
        tally = Tally()
        got = request_samples(t, [{"role": "user", "content": "hi"}], 2, SamplingParams(8, 0.7, 0.9), tally,
                              sleep=waits.append)
    assert got == [("a", "stop"), ("b", "stop")]
    assert dict(tally.retries) == {"rate_limited": 1, "server_error": 1, "unreachable": 1, "garbage": 2}
    assert tally.failed == 0
    # backoff doubles from 0.5 s (with up to 10% jitter); the 429's Retry-After of 3 s wins over 0.5 s
    assert len(waits) == 5 and all(b <= w <= 1.1 * b for w, b in zip(waits, [3, 1, 2, 4, 8], strict=True)), waits
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sekrit"
    assert (seen[0]["n"], seen[0]["temperature"], seen[0]["top_p"], seen[0]["max_tokens"]) == (2, 0.7, 0.9, 8)

    with _endpoint(lambda i, body: (500, "down", {})) as (url, _):
        tally = Tally()
        t = TeacherConfig(url=url, retries=2, backoff=0.01, timeout=10)
        assert request_samples(t, [{"role": "user", "content": "hi"}], 1, SamplingParams(8), tally,
                               sleep=lambda s: None) is None
        assert tally.failed == 1 and dict(tally.retries) == {"server_error": 2} and "answered 500" in tally.last_error

    with _endpoint(lambda i, body: (401, {"error": "bad key"}, {})) as (url, seen):
        t = TeacherConfig(url=url, api_key_env="NO_SUCH_KEY_VAR", retries=5, timeout=10)
        with pytest.raises(TeacherError, match=r"answered 401.*is NO_SUCH_KEY_VAR set\?"):
            request_samples(t, [{"role": "user", "content": "hi"}], 1, SamplingParams(8), Tally(),
                            sleep=lambda s: None)
        assert len(seen) == 1  # not retried


@pytest.mark.unit
def test_a_bad_request_fails_its_prompt_only_and_retry_after_takes_a_date():
    """A 400 (vLLM's answer to a prompt plus max_tokens over the context) is about that prompt: counted, not
    retried, and the run goes on; a 404 (a wrong URL or model) stops it. Retry-After as an HTTP date is honoured,
    and capped at distill.teacher.timeout; an error body cut off mid-read is retried like any 5xx."""
    import email.utils
    import io
    import time
    import urllib.error

    from grpo.loop.distill import Tally, TeacherError, _body, _retry_after, request_samples

    with _endpoint(lambda i, body: (400, {"error": "maximum context length is 2048 tokens"}, {})) as (url, seen):
        tally = Tally()
        t = TeacherConfig(url=url, retries=5, backoff=0.01, timeout=10)
        assert request_samples(t, [{"role": "user", "content": "hi"}], 1, SamplingParams(8), tally,
                               sleep=lambda s: None) is None
        assert len(seen) == 1 and tally.failed == 1 and not tally.retries and "maximum context" in tally.last_error
    with _endpoint(lambda i, body: (404, {"error": "model 'm' does not exist"}, {})) as (url, _):
        with pytest.raises(TeacherError, match=r"answered 404.*does not exist"):
            request_samples(TeacherConfig(url=url, retries=5, timeout=10), [{"role": "user", "content": "hi"}], 1,
                            SamplingParams(8), Tally(), sleep=lambda s: None)

    def error(headers: dict, fp=None) -> urllib.error.HTTPError:
        from email.message import Message

        msg = Message()
        for k, v in headers.items():
            msg[k] = v
        return urllib.error.HTTPError("http://x", 429, "busy", msg, fp)

    in_40s = email.utils.formatdate(time.time() + 40, usegmt=True)
    assert 38 <= _retry_after(error({"Retry-After": in_40s}), 1.0, cap=300) <= 41
    assert _retry_after(error({"Retry-After": "86400"}), 1.0, cap=300) == 300
    assert _retry_after(error({"Retry-After": "soon"}), 1.5, cap=300) == 1.5
    assert _retry_after(error({}), 2.0, cap=300) == 2.0

    class Reset(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise ConnectionResetError("reset mid-body")

    assert "body unreadable" in _body(error({}, io.BufferedReader(Reset())))


@pytest.mark.unit
def test_reasoning_goes_back_inside_think_tags():
    from grpo.loop.distill import _text

    assert _text({"content": "42", "reasoning_content": "6 x 7"}) == "<think>\n6 x 7\n</think>\n42"
    assert _text({"content": "42"}) == "42"


@pytest.mark.unit
def test_keep_all_best_shortest_by_hand():
    from grpo.loop.distill import build_dataset

    def s(pid, i, passed, total, toks):
        return {"prompt_id": pid, "index": i, "passed": passed, "total": total, "num_tokens": toks,
                "prompt": [{"role": "user", "content": pid}], "completion": f"{pid}-{i}", "answer": "1",
                "teacher": "t", "sampling": "{}", "rewards": "{}", "finish_reason": "stop"}

    samples = [s("a", 0, True, 1.0, 30), s("a", 1, False, 0.0, 5), s("a", 2, True, 1.2, 40),
               s("a", 3, True, 1.0, 20), s("b", 0, False, 0.0, 9), s("b", 1, False, 0.0, 9),
               # passed, but another reward failed on them (total null): they rank last on total
               s("c", 0, True, None, 7), s("c", 1, True, 0.5, 12), s("c", 2, True, None, 12)]
    kept = {k: [r["completion"][0]["content"] for r in build_dataset(samples, k)[0]] for k in ("all", "best",
                                                                                              "shortest")}
    assert kept == {"all": ["a-0", "a-2", "a-3", "c-0", "c-1", "c-2"], "best": ["a-2", "c-1"],
                    "shortest": ["a-3", "c-0"]}
    _, report = build_dataset(samples, "all")
    assert report["pass_rate"] == 6 / 9 and report["prompts_with_a_pass"] == 2 / 3
    assert report["passes_per_prompt"] == {"0": 1, "3": 2} and report["kept_fraction"] == 6 / 9
    assert report["kept_tokens"] == 121 and report["sampled_tokens"] == 144


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
        return (200, _chat([f"The answer is {gold[body['messages'][-1]['content']]}", "no idea"]), {})

    args = tiny_overrides(tiny_model_dir, out, **{"distill.num_prompts": 8, "distill.batch_prompts": 4,
                                                  "distill.num_samples": 2, "distill.teacher.retries": 1,
                                                  "distill.teacher.backoff": 0.01, "distill.teacher.model": "t",
                                                  "rewards": "[{name: accuracy}]"})
    with _endpoint(script) as (url, seen):
        calls = {"n": 0}

        def flaky(i, body):  # answers the first four requests, then is down for maintenance
            calls["n"] += 1
            return script(i, body) if calls["n"] <= 4 else (503, "maintenance", {})

        with _endpoint(flaky) as (url2, _):
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


@pytest.mark.unit
def test_a_new_shard_never_takes_an_existing_name(tmp_path):
    from grpo.loop.distill import next_shard, read_shards, write_shard

    assert next_shard(tmp_path / "none") == 0
    for i in (0, 2):  # a gap: the count (2) would name shard 2 again
        write_shard(tmp_path, i, [{"prompt_id": str(i)}])
    assert next_shard(tmp_path) == 3
    assert [s["prompt_id"] for s in read_shards(tmp_path)] == ["0", "2"] and not list(tmp_path.glob(".*tmp"))


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
