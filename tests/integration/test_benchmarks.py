"""The benchmark scripts stay runnable: each on a tiny configuration (figures are not asserted; they are measured
by running the scripts, see docs/benchmarks.md). (Their arithmetic by hand:
tests/unit/benchmarks/test_benchmarks.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.integration
@pytest.mark.parametrize("lengths", ["fixed", "varied"])
def test_train_phase_runs_both_paths(tmp_path, lengths):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_phase.py"), "--layers", "1", "--hidden",
                        "64", "--inter", "128", "--heads", "2", "--kv-heads", "1", "--vocab", "4096", "--prompts", "2",
                        "--group", "2", "--prompt-len", "8", "--completion", "8", "--micro", "2", "--reps", "1",
                        "--lengths", lengths, "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    tokens = [res[k]["tokens_per_s"] * res[k]["seconds"] for k in ("ours", "trl")]
    assert tokens[0] == pytest.approx(tokens[1])  # both trained on the same completions
    for k in ("ours", "trl"):
        assert res[k]["seconds"] > 0 and res[k]["peak_gib"] > 0
    if lengths == "fixed":
        assert tokens[0] == pytest.approx(2 * 2 * 8)
    else:  # lengths drawn from [completion/4, completion]
        assert 2 * 2 * 2 <= tokens[0] < 2 * 2 * 8
    assert math.isfinite(res["ratio_tokens_per_s"]) and "ours/TRL" in p.stdout
    # the same loss on the same weights and batch: the same gradient (fp32), so the race is fair. One layer of hidden
    # 64, a vocabulary of 4096: the two implementations differ in the order of fp32 sums only, about 1e-6 relative
    # on any CPU's kernels; a different loss or normaliser is off by far more than 1e-4
    assert abs(res["ours"]["grad_norm"] - res["trl"]["grad_norm"]) <= 1e-4 * res["trl"]["grad_norm"]


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.integration
@pytest.mark.slow
def test_logprob_layouts_agree_on_varied_lengths(tiny_model_dir):
    """Completions of 1 to 43 tokens: the three layouts give the same gradient (padding and masks matter here). On
    the tiny model: the script's path is what is smoke-run; the layouts' agreement at the embedded model's size is
    the benchmark's own output. fp32 sums of a few thousand terms in different orders: relative differences near
    1e-6, so 1e-4 holds on any CPU's kernels."""
    p = _run("logprob_layouts.py", "--reps", "1", "--lengths", "varied", "--model", str(tiny_model_dir))
    norms = [float(line.split("grad norm")[1]) for line in p.stdout.splitlines() if "grad norm" in line]
    assert len(norms) == 3 and max(norms) - min(norms) <= 1e-4 * max(norms), p.stdout


@pytest.mark.integration
@pytest.mark.root  # code rewards in the bubblewrap sandbox
def test_reward_throughput_runs(tmp_path):
    out = tmp_path / "r.json"
    _run("reward_throughput.py", "--n", "12", "--workers", "2", "--json", str(out))
    res = json.loads(out.read_text())
    assert res and all(v > 0 for v in _numbers(res))


@pytest.mark.integration
@pytest.mark.slow
def test_compare_trl_runs_both_trainers(tmp_path, tiny_model_dir):
    out = tmp_path / "r.json"
    p = _run("compare_trl.py", "--steps", "2", "--max-new", "6", "--json", str(out), "--model", str(tiny_model_dir))
    res = json.loads(out.read_text())
    for k in ("ours", "trl"):
        assert res[k]["step_s"] > 0 and res[k]["peak_gib"] > 0, res
    assert "ours/TRL" in p.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_compare_trl_sft_runs_both_trainers(tmp_path, tiny_model_dir):
    out = tmp_path / "r.json"
    p = _run("compare_trl_sft.py", "--steps", "2", "--rows", "64", "--json", str(out), "--model", str(tiny_model_dir))
    res = json.loads(out.read_text())
    for k in ("ours", "trl"):
        assert res[k]["step_s"] > 0 and res[k]["peak_gib"] > 0 and res[k]["tokens_per_s"] > 0, res
    assert "ours/TRL" in p.stdout


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generation_runs(tmp_path, vllm_tiny_dir):
    out = tmp_path / "r.json"
    _run("vllm_generation.py", "--prompts", "2", "--n", "3", "--max-new-tokens", "8", "--reps", "1", "--json", str(out),
         "--model", str(vllm_tiny_dir))
    res = json.loads(out.read_text())
    assert res and all(v > 0 for v in _numbers(res))


def _numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_server_mode_benchmark_runs(tmp_path, vllm_tiny_dir, vllm_server):
    out = tmp_path / "r.json"
    _run("server_mode.py", "--steps", "2", "--model", str(vllm_tiny_dir), "--server", vllm_server, "--json", str(out),
         "data.num_train=64", "data.num_eval=8", "rollout.prompts_per_step=2", "rollout.num_generations=4",
         "rollout.max_new_tokens=6", "optim.micro_batch_size=4")
    res = json.loads(out.read_text())
    assert res["sync"]["time/step"] > 0 and res["async"]["time/wait_rollout"] >= 0
    assert res["expected_speedup_on_separate_devices"] >= 1.0
