"""`grpo distill`: the endpoint client's retries and refusals (against a scripted local HTTP endpoint), the
selection of verified samples (by hand), and shard names. (Real runs: tests/integration/test_distill.py.)"""

from __future__ import annotations

import pytest

from grpo.config import TeacherConfig
from grpo.rollout.base import SamplingParams
from tests.helpers import chat_completion, scripted_endpoint


@pytest.mark.unit
def test_endpoint_retries_what_is_worth_retrying(monkeypatch):
    from grpo.loop.distill import Tally, TeacherError, request_samples

    steps = [(429, {"error": "slow down"}, {"Retry-After": "3"}), (503, "busy", {}), "drop",
             (200, "not json", {}), (200, chat_completion(["only one"]), {}), (200, chat_completion(["a", "b"]), {})]
    waits: list[float] = []
    monkeypatch.setenv("TEACHER_KEY", "sekrit")
    with scripted_endpoint(lambda i, body: steps[i]) as (url, seen):
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

    with scripted_endpoint(lambda i, body: (500, "down", {})) as (url, _):
        tally = Tally()
        t = TeacherConfig(url=url, retries=2, backoff=0.01, timeout=10)
        assert request_samples(t, [{"role": "user", "content": "hi"}], 1, SamplingParams(8), tally,
                               sleep=lambda s: None) is None
        assert tally.failed == 1 and dict(tally.retries) == {"server_error": 2} and "answered 500" in tally.last_error

    with scripted_endpoint(lambda i, body: (401, {"error": "bad key"}, {})) as (url, seen):
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

    with scripted_endpoint(
            lambda i, body: (400, {"error": "maximum context length is 2048 tokens"}, {})) as (url, seen):
        tally = Tally()
        t = TeacherConfig(url=url, retries=5, backoff=0.01, timeout=10)
        assert request_samples(t, [{"role": "user", "content": "hi"}], 1, SamplingParams(8), tally,
                               sleep=lambda s: None) is None
        assert len(seen) == 1 and tally.failed == 1 and not tally.retries and "maximum context" in tally.last_error
    with scripted_endpoint(lambda i, body: (404, {"error": "model 'm' does not exist"}, {})) as (url, _):
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


@pytest.mark.unit
def test_a_new_shard_never_takes_an_existing_name(tmp_path):
    from grpo.loop.distill import next_shard, read_shards, write_shard

    assert next_shard(tmp_path / "none") == 0
    for i in (0, 2):  # a gap: the count (2) would name shard 2 again
        write_shard(tmp_path, i, [{"prompt_id": str(i)}])
    assert next_shard(tmp_path) == 3
    assert [s["prompt_id"] for s in read_shards(tmp_path)] == ["0", "2"] and not list(tmp_path.glob(".*tmp"))
