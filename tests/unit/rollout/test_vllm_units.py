"""Units of the vLLM engines that need no running vLLM: the `vllm serve` command `grpo serve` builds, the client's
reading of OpenAI-compatible completions, the colocated engine handing CUDA's cached memory back before vLLM wakes, the
sync's checksums, and the client's deadline on a server that never answers. (tests/integration/test_vllm.py runs the
real servers.)"""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch

from grpo.commands import serve
from grpo.config import load_config
from grpo.rollout import server as server_client

pytestmark = pytest.mark.unit


def test_vllm_serve_command_carries_the_recipe():
    cfg = load_config(None, ["rewards=[{name: accuracy}]", "model.dtype=bfloat16", "seed=7",
                             "rollout.vllm.kv_cache_gib=0.5", "rollout.max_new_tokens=32"])
    cmd, env = serve.vllm_serve_command(cfg, "/m", "cpu", "127.0.0.1", 8123, 4096)
    assert cmd[1:5] == ["-m", "grpo.commands.vllm_cli", "serve", "/m"]
    flag = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
    assert flag("--port") == "8123" and flag("--dtype") == "bfloat16" and flag("--seed") == "7"
    assert flag("--max-model-len") == str(512 + 32)  # data.max_prompt_tokens + rollout.max_new_tokens
    assert flag("--kv-cache-memory-bytes") == str(2**29) and flag("--logprobs-mode") == "processed_logprobs"
    assert json.loads(flag("--weight-transfer-config")) == {"backend": "grpo_broadcast"}
    assert flag("--worker-extension-cls") == "grpo.vllm_plugin.GrpoWorkerExtension"
    assert "--enforce-eager" in cmd and "--enable-prefix-caching" in cmd and flag("--generation-config") == "vllm"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


def test_completions_are_read_prompt_major():
    choices = [{"token_ids": [5 + i, 2], "logprobs": {"token_logprobs": [-0.5 - i, -0.1]},
                "finish_reason": "stop" if i % 2 else "length"} for i in range(6)]
    got = server_client.samples_from(choices, 2, 3)
    assert [[s["ids"][0] for s in g] for g in got] == [[5, 6, 7], [8, 9, 10]]
    assert got[1][0] == {"ids": [8, 2], "logprobs": [-3.5, -0.1], "finish_reason": "stop",
                         "stop_reason": None}
    with pytest.raises(server_client.ServerError, match="expected 4 completions, got 6"):
        server_client.samples_from(choices, 2, 2)
    choices[0]["logprobs"]["token_logprobs"] = [-0.5]
    with pytest.raises(server_client.ServerError, match="1 logprobs for 2 tokens"):
        server_client.samples_from(choices, 2, 3)
    body = server_client.completion_body([[1, 2]], 3, server_client.SamplingParams(8, greedy=True), [2])
    assert body["temperature"] == 0.0 and body["top_k"] == 0 and body["return_token_ids"] and body["logprobs"] == 0
    assert body["repetition_penalty"] == 1.0 and body["presence_penalty"] == body["min_p"] == 0.0



def test_colocated_and_server_engines_are_asked_for_the_same_sampling():
    """One rule for vLLM's sampling: the in-process SamplingParams and the server's request carry the same values
    (temperature 0.7 and top-p 0.9 in, nothing else changed from the trainer's distribution)."""
    from grpo.rollout.vllm_engine import vllm_sampling_params

    params = server_client.SamplingParams(8, temperature=0.7, top_p=0.9)
    sp = vllm_sampling_params(params, 3, [2])
    body = server_client.completion_body([[1, 5]], 3, params, [2])
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (body["temperature"], body["top_p"], body["top_k"],
                                                                body["min_p"]) == (0.7, 0.9, -1, 0.0)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (body["repetition_penalty"], body["presence_penalty"], body["frequency_penalty"]) == (1.0, 0.0, 0.0)
    assert sp.n == body["n"] == 3 and sp.max_tokens == body["max_tokens"] == 8 and sp.logprobs == body["logprobs"] == 0
    assert list(sp.stop_token_ids) == body["stop_token_ids"] == [2] and sp.skip_special_tokens is True

def test_colocated_engine_empties_the_cuda_cache_before_waking(monkeypatch):
    """vLLM wakes into memory PyTorch's caching allocator still holds unless it is handed back first (CUDA only; the
    order of calls is checked with the engine object's own method and recorders for CUDA and vLLM)."""
    import torch

    from grpo.rollout.vllm_engine import VLLMEngine

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

    from grpo.rollout import vllm_engine
    from grpo.rollout.vllm_engine import VLLMEngine

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
    from grpo.rollout.http import ServerError, request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=f"vLLM server {url} did not answer /v1/completions within 2 s"):
            request(url, "/v1/completions", {}, 2.0)
        assert time.monotonic() - t0 < 10


def test_checksums_compare_what_they_should():
    from grpo.runtime.weights import checksum, checksums_match

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


class _Recorder:
    """Stands in for `grpo.rollout.http.request` in transfer.base: records (url, route, body), answers None."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, url, route, body, timeout):
        self.calls.append((url, route, body))


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3, bias=True))


def test_servers_client_gives_each_server_its_own_ranks(monkeypatch):
    from grpo.rollout.transfer import base as transfer
    rec = _Recorder()
    monkeypatch.setattr(transfer, "request", rec)
    client = transfer.ServersClient(["http://a:1", "http://b:2", "http://c:3"], 5.0)
    client.init_weight_transfer_engine({"master_address": "h", "master_port": 9, "rank_offset": 1, "world_size": 4})
    got = sorted((u, b["init_info"]["rank_offset"], b["init_info"]["world_size"]) for u, _, b in rec.calls)
    assert got == [("http://a:1", 1, 4), ("http://b:2", 2, 4), ("http://c:3", 3, 4)]
    rec.calls.clear()
    client.version = 7
    client.finish_weight_update()
    assert sorted(b["weight_version"] for _, r, b in rec.calls if r == "/finish_weight_update") == ["7", "7", "7"]


def test_nccl_trainer_engine_from_vllms_factory_on_a_faked_gpu(monkeypatch):
    """What the GPU path does up to the NCCL call, on CPU: vLLM's factory builds vLLM's NCCL trainer engine from
    our init info; the sender hands each server the worker init (its rank offset, the whole world, the packed wire
    params) while opening its own endpoint; a non-sender rank opens nothing and sends no request."""
    from vllm.distributed.weight_transfer import nccl_engine

    from grpo.rollout.transfer import base as transfer
    rec = _Recorder()
    monkeypatch.setattr(transfer, "request", rec)
    opened = []
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: opened.append(info) or "comm")
    client = transfer.ServersClient(["http://a:1", "http://b:2"], 5.0)
    source = transfer.ModelSource(False, 2**20, sums=True)
    kw = {"host": "10.0.0.1", "port": 5555, "num_servers": 2, "bucket_bytes": 2**20, "timeout": 5.0,
          "client": client, "source": source}
    engine = transfer.trainer_engine("nccl", rank=0, **kw)
    assert type(engine).__name__ == "NCCLTrainerWeightTransferEngine" and engine.model_update_group == "comm"
    assert opened[0].world_size == 3 and opened[0].master_port == 5555
    inits = sorted((u, b["init_info"]) for u, r, b in rec.calls)
    assert [(u, i["rank_offset"], i["world_size"], i["packed"], i["packed_buffer_size_bytes"]) for u, i in inits] == [
        ("http://a:1", 1, 3, True, 2**20), ("http://b:2", 2, 3, True, 2**20)]
    assert all(i["master_address"] == "10.0.0.1" for _, i in inits)

    rec.calls.clear()
    other = transfer.trainer_engine("nccl", rank=1, **kw)
    source.model = _tiny_model()
    other.send_weights()  # a non-sender only walks the source (its ZeRO-3 gathers)
    assert rec.calls == [] and len(opened) == 1 and source.sent is not None


def test_model_source_agrees_with_its_metadata_and_sums_what_it_yields():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine as Nccl

    from grpo.rollout.transfer import base as transfer
    from grpo.rollout.transfer import broadcast
    from grpo.runtime.weights import buckets as weights_buckets
    from grpo.runtime.weights import checksum

    model = _tiny_model()
    source = transfer.ModelSource(False, 64, sums=True)  # 64 bytes: several buckets
    source.model = model
    pairs = list(Nccl._checked_iter(source, source.metadata()))  # vLLM's own contract check
    assert [n for n, _ in pairs] == ["0.weight", "1.weight", "1.bias"]
    assert source.sent == checksum(model.parameters())
    source.begin(model)
    it = iter(source)
    next(it)  # a send that failed after one tensor
    assert source.sent is None
    source.finish_pass()  # walks the rest (the other ranks' gathers)
    assert source.sent == checksum(model.parameters())
    source.begin(model)
    source.sent = None
    source.finish_pass()  # rank 0 failed before sending (a dead server at /pause): a whole pass, gathers included
    assert source.sent == checksum(model.parameters())
    buckets = list(weights_buckets(iter(pairs), 64))
    assert [[n for n, _ in b] for b in buckets] == [["0.weight"], ["1.weight", "1.bias"]]  # 160 B, then 48 + 12
    assert broadcast.dtype_groups(buckets[1]) == [("float32", [("1.weight", [3, 4]), ("1.bias", [3])])]


def test_weight_transfer_backend_is_resolved_per_machine(monkeypatch):
    from grpo.rollout.transfer import base as transfer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert transfer.resolve_backend("auto", "auto") == "nccl"
    assert transfer.resolve_backend("auto", "cpu") == "grpo_broadcast"
    assert transfer.resolve_backend("grpo_broadcast", "cuda") == "grpo_broadcast"
    cfg = load_config(None, ["rewards=[{name: accuracy}]"])
    cmd, _ = serve.vllm_serve_command(cfg, "/m", "cuda", "127.0.0.1", 8123, 4096)
    assert json.loads(cmd[cmd.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
