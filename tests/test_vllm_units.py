"""Units of the vLLM engines that need no vLLM: the server merges concurrent generation requests into one engine
call (with W training ranks it used to run W small calls one after another behind its lock; the engine here is a
recorder, tests/test_vllm.py runs the real server with two training ranks), the colocated engine hands CUDA's
cached memory back before vLLM wakes, the sync's checksums, and the client's deadline on a server that never
answers."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest
import torch

from grpo.serve import RequestMerger

pytestmark = pytest.mark.unit


def test_concurrent_requests_become_one_engine_call():
    calls = []

    def run(prompts, params):
        calls.append((list(prompts), list(params)))
        return [f"out-{p}-{s}" for p, s in zip(prompts, params, strict=True)]

    merger = RequestMerger(run, max_wait=30)
    got: dict[int, list] = {}
    start = threading.Barrier(3)

    def rank(r: int):
        start.wait()
        got[r] = merger.submit([f"p{r}a", f"p{r}b"], [f"s{r}", f"s{r}"], expect=3)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and sorted(calls[0][0]) == ["p0a", "p0b", "p1a", "p1b", "p2a", "p2b"]
    for r in range(3):  # every caller gets its own outputs, in its own order, with its own parameters
        assert got[r] == [f"out-p{r}a-s{r}", f"out-p{r}b-s{r}"]
    assert merger.submit(["q"], ["t"]) == ["out-q-t"] and len(calls) == 2  # later requests: a new call
    t0 = __import__("time").monotonic()
    assert RequestMerger(run, max_wait=0.3).submit(["r"], ["u"], expect=2) == ["out-r-u"]  # a rank that never
    assert __import__("time").monotonic() - t0 < 5  # comes (no held-out rows) costs at most max_wait


def test_an_engine_error_reaches_every_caller_of_the_batch():
    def run(prompts, params):
        raise RuntimeError("engine died")

    merger = RequestMerger(run, max_wait=30)
    errors = []

    def call():
        try:
            merger.submit(["x"], ["s"], expect=2)
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["engine died", "engine died"]
    with pytest.raises(RuntimeError, match="engine died"):
        merger.submit(["y"], ["s"])


def test_colocated_engine_empties_the_cuda_cache_before_waking(monkeypatch):
    """vLLM wakes into memory PyTorch's caching allocator still holds unless it is handed back first (CUDA only; the
    order of calls is checked with the engine object's own method and recorders for CUDA and vLLM)."""
    import torch

    from grpo.vllm_engine import VLLMEngine

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    eng = VLLMEngine.__new__(VLLMEngine)
    eng.asleep = True
    eng.llm = type("LLM", (), {"wake_up": lambda self, tags=None: calls.append(("wake_up", tags))})()
    eng._wake(["weights"])
    assert calls == ["empty_cache", ("wake_up", ["weights"])]


def test_colocated_engine_discards_weights_in_release_and_refuses_to_generate_before_sync(monkeypatch):
    """release() sleeps at level 2 (the sync rewrites every weight, so level 1's host copy is waste); the sync wakes
    the weights before loading, the KV cache after; generating between release and sync is an error, since the
    engine's weights are garbage then (vLLM's own sleep is a no-op on CPU, so the calls are recorded here)."""
    import torch

    from grpo import vllm_engine
    from grpo.vllm_engine import VLLMEngine

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class LLM:
        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tags))

    eng = VLLMEngine.__new__(VLLMEngine)
    eng.llm, eng.can_sleep, eng.asleep, eng.discarded = LLM(), True, False, False
    eng.release()
    assert calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="sync before generate"):
        eng.generate([[1, 2]], 1, None)
    monkeypatch.setattr(vllm_engine, "weight_buckets", lambda *a: iter([[("w", torch.ones(2))]]))
    monkeypatch.setattr(vllm_engine, "load_weights", lambda llm, b: calls.append(("load", len(b))))
    monkeypatch.setattr(vllm_engine, "finish_sync", lambda llm, probe: ((2.0, 2.0), [-1.0]))
    monkeypatch.setattr(vllm_engine, "trainer_probe_logprobs", lambda model, probe: [-1.0])
    from grpo.config import load_config

    eng.cfg = load_config(None, ["rewards=[{name: accuracy}]"])
    eng.zero3, eng.probe = False, [1, 2]
    eng.sync(None)
    assert calls == [("sleep", 2), ("wake_up", ["weights"]), ("load", 1), ("wake_up", ["kv_cache"])]
    assert not eng.asleep and not eng.discarded


def test_server_that_stops_answering_mid_request(tmp_path):
    """A server that accepts the connection and never replies: the client's deadline turns it into an error."""
    from grpo.serve import ServerError, post

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=f"vLLM server {url} did not answer /generate within 2 s"):
            post(url, "/generate", {}, 2.0)
        assert time.monotonic() - t0 < 10


def test_checksums_compare_what_they_should():
    from grpo.weights import checksum, checksums_match

    a = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert checksum(a) == (2.0, 14.0)  # 1 - 2 + 3; 1 + 4 + 9
    fused = [torch.tensor([1.0, -2.0, 3.0])]  # vLLM fuses q/k/v and gate/up: the sums are unchanged
    assert checksums_match(checksum(a), checksum(fused))
    assert not checksums_match(checksum(a), checksum([torch.tensor([1.0, -2.0, 3.001])]))
    assert not math.isnan(checksum([])[0])
    # summed in slices (no whole-tensor float64 copy): the same figures as the whole-tensor sum
    big = [torch.randn(1000, 37), torch.randn(5)]
    whole = (sum(float(t.double().sum()) for t in big), sum(float((t.double() ** 2).sum()) for t in big))
    assert checksums_match(checksum(big, slice_numel=999), whole, rel=1e-12)
