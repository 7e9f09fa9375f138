"""`grpo doctor` on CPU: the embedded recipe with the HF engine and with colocated vLLM passes every check; a broken
sync (a corrupted bucket), a recipe that cannot fit and a sandbox that does not isolate each fail, naming the check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import RECIPE, ROOT

pytestmark = pytest.mark.integration


def doctor(tmp_path: Path, *args: str, wrapper: str | None = None, timeout: int = 600):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    argv = ["doctor", str(RECIPE), f"output_dir={tmp_path / 'run'}", *args]
    if wrapper is None:
        cmd = [sys.executable, "-m", "grpo", *argv]
    else:  # a script that changes something in-process, then runs the CLI
        script = tmp_path / "wrapper.py"
        script.write_text(wrapper + f"\nfrom grpo.commands.cli import main\nraise SystemExit(main({argv!r}))\n")
        cmd = [sys.executable, str(script)]
    # the run directory is the cwd: nothing of the caller's cwd shadows an import (a stray ./z3 did, once)
    (tmp_path / "cwd").mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=timeout)


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{check: (status, figures)} from the printed table."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(devices|plan|sandbox|set-up|collectives|first sync|training steps|memory|checkpoint)\s+"
                     r"(PASS|FAIL|SKIP)\s+(.*)$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


@pytest.mark.slow
def test_embedded_recipe_passes_with_the_hf_engine(tmp_path):
    p = doctor(tmp_path)
    r = rows(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(r) == 9 and "verdict: PASS (7 checks passed, 2 skipped)" in p.stdout
    assert r["sandbox"][0] == "SKIP" and r["first sync"][0] == "SKIP"
    steps = r["training steps"][1]
    assert steps.startswith("step 1: ") and "; step 2: " in steps
    assert "weights restored exactly" in r["checkpoint"][1]
    measured, predicted = map(float, re.search(r"measured peak ([\d.]+) GiB.*predicted ([\d.]+) GiB",
                                               r["memory"][1]).groups())
    # the prediction's one term not derived from shapes, the libraries' RSS, is read on this machine by doctor itself
    # (doctor.libraries_rss_gib); its verdict, and this bound, allow 1.3x (doctor.MEMORY_SLACK)
    assert "GiB RSS here" in r["plan"][1]
    assert 0 < measured < 1.3 * predicted
    assert not (tmp_path / "run" / "doctor").exists()  # removed without --keep


@pytest.mark.slow
@pytest.mark.vllm
def test_embedded_recipe_passes_with_colocated_vllm(tmp_path):
    pytest.importorskip("vllm") if not os.environ.get("CI") else None
    p = doctor(tmp_path, "rollout.engine=vllm", "--keep")
    r = rows(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert r["first sync"][0] == "PASS" and "checksum ok" in r["first sync"][1]
    canary = float(re.search(r"canary mean \|diff\| ([\d.e+-]+)", r["first sync"][1]).group(1))
    assert canary < 0.005
    assert r["training steps"][1].count("sync ") == 2  # each step's sync was checked
    ckpt = tmp_path / "run" / "doctor" / "checkpoints" / "step-000001"
    assert (ckpt / "meta.json").is_file()  # --keep keeps it


CORRUPT = """
import torch
import grpo.rollout.vllm_engine as ve
real = ve.load_weights
def corrupt(llm, bucket):  # one value of the first tensor of every bucket is changed on its way to vLLM
    real(llm, [(n, t.clone().view(-1).index_fill_(0, torch.tensor([0]), 7.0).view_as(t)) if i == 0 else (n, t)
               for i, (n, t) in enumerate(bucket)])
ve.load_weights = corrupt
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_a_corrupted_bucket_fails_the_first_sync(tmp_path):
    pytest.importorskip("vllm") if not os.environ.get("CI") else None
    p = doctor(tmp_path, "rollout.engine=vllm", wrapper=CORRUPT)
    r = rows(p.stdout)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert r["first sync"][0] == "FAIL" and "weight checksum differs" in r["first sync"][1]
    assert all(r[k][0] == "SKIP" for k in ("training steps", "memory", "checkpoint"))
    assert "verdict: FAIL (first sync)" in p.stdout


def test_a_recipe_that_cannot_fit_fails_the_plan(tmp_path):
    p = doctor(tmp_path, "--memory", "0.5")
    r = rows(p.stdout)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert r["plan"][0] == "FAIL" and "of 0.5 GiB" in r["plan"][1] and "does not fit" in r["plan"][1]
    assert "fix: " in p.stdout and "verdict: FAIL (plan)" in p.stdout
    assert r["set-up"][0] == "SKIP"  # nothing was loaded


@pytest.mark.root
def test_sandbox_check_passes_in_bubblewrap_and_fails_without_it(monkeypatch):
    from grpo.commands.doctor import FAIL, PASS, SKIP, sandbox_check
    from grpo.config import load_config
    from rewards.sandbox import UNSAFE_ENV

    assert sandbox_check(load_config(RECIPE, [])).status == SKIP  # no code reward
    cfg = load_config(RECIPE, ["rewards=[{name: code_tests}]"])
    c = sandbox_check(cfg)
    assert c.status == PASS, c
    assert "network no" in c.figures and "harness read-only" in c.figures and "uid 0," not in c.figures
    monkeypatch.setenv(UNSAFE_ENV, "1")  # the unsandboxed fallback: no namespaces, the caller's uid
    c = sandbox_check(cfg)
    assert c.status == FAIL and "pid namespace" in c.figures, c


def test_bad_recipe_is_a_usage_error(tmp_path):
    p = doctor(tmp_path, "rollout.num_generations=0")
    assert p.returncode == 2 and "rollout.num_generations" in p.stderr
