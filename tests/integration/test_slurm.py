"""The shipped sbatch scripts on a real one-node slurm (munged + slurmctld + slurmd on this machine):
preemption warning -> checkpoint -> requeue -> resume -> finish with no step lost or repeated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, tiny_overrides

# one xdist worker runs them all, one after another: they share the one-node cluster (and its start-up)
pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def slurm():
    def up() -> bool:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        return p.returncode == 0 and any(s in p.stdout for s in ("idle", "mix", "alloc"))

    if shutil.which("sinfo") is None or not up():
        if shutil.which("slurmctld") and os.geteuid() == 0:
            subprocess.run(["bash", str(ROOT / "scripts" / "slurm-local.sh"), "start"], check=True, timeout=180)
        elif os.environ.get("CI"):
            pytest.fail("slurm is not installed (scripts/system-deps.sh installs it as root)")
        else:
            pytest.skip("no slurm here (root: bash scripts/system-deps.sh && bash scripts/slurm-local.sh start)")
    assert up()


def _job(jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(jid: str, states: tuple[str, ...], timeout: float = 600) -> dict[str, str]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        j = _job(jid)
        if j.get("JobState") in states:
            return j
        time.sleep(1)
    raise TimeoutError(f"job {jid} never reached {states}: {_job(jid)}")


def _sbatch(script: str, args: list[str], out: Path, env_extra: dict[str, str] | None = None,
            sbatch_args: list[str] = ()) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
           "GRPO_PYTHON": str(Path(os.sys.executable)), **(env_extra or {})}
    p = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={out}", *sbatch_args,
                        str(ROOT / "slurm" / script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _steps(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip().endswith("}")]


@pytest.mark.parametrize("nproc", [1, 2])
def test_preempted_job_requeues_and_resumes(slurm, tmp_path, tiny_model_dir, nproc):
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 8
    args = ["recipes/smollm2-135m-arith.yaml", *tiny_overrides(tiny_model_dir, run, **{
        "steps": steps, "checkpoint.every": 100})]  # only the preemption makes a mid-run checkpoint
    jid = _sbatch("train.slurm", args, log, {"GRPO_NPROC": str(nproc)})
    text = _preempt_and_finish(jid, run, log, steps)
    assert "start 2 on" in text
    assert (run / "final" / "model.safetensors").is_file()


def _preempt_and_finish(jid: str, run: Path, log: Path, steps: int) -> str:
    """Send the preemption warning after two steps; check the requeue, the resume and that every step ran once."""
    t0 = time.monotonic()
    while len(_steps(run)) < 2:
        assert time.monotonic() - t0 < 300, log.read_text()[-3000:] if log.exists() else "no log"
        assert _job(jid).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.2)
    # what slurm does before a time limit with --signal=B:USR1@120, sent now
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    t0 = time.monotonic()
    while _job(jid).get("Restarts", "0") == "0":
        assert time.monotonic() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.5)
    # slurm holds a requeued job ~2 minutes before it is eligible again (so the node can clean up the previous
    # start); once it is pending and the old batch step is gone, make it eligible sooner
    _wait(jid, ("PENDING",), timeout=120)
    t0 = time.monotonic()
    while subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{jid}\\."], capture_output=True).returncode == 0:
        assert time.monotonic() - t0 < 120
        time.sleep(0.5)
    time.sleep(10)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=False)
    j = _wait(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert j["JobState"] == "COMPLETED", text[-3000:]
    assert j["Restarts"] == "1"
    assert "requeueing job" in text and "resumed from" in text
    assert _steps(run) == list(range(1, steps + 1)), "a step was lost or repeated across the requeue"
    return text


@pytest.mark.vllm
def test_multinode_job_with_vllm_servers(slurm, tmp_path, vllm_tiny_dir):
    """slurm/multinode.slurm on the one-node cluster (both roles share the node): a vLLM server step and a trainer
    step, weights synced every step, preempted, requeued (servers too), resumed, finished."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 6
    args = ["recipes/smollm2-135m-arith.yaml", *tiny_overrides(vllm_tiny_dir, run, **{
        "steps": steps, "checkpoint.every": 100, "rollout.vllm.sync_port": free_port()})]
    jid = _sbatch("multinode.slurm", args, log, {"GRPO_NPROC": "1", "GRPO_SERVER_PORT": str(free_port()),
                                                  "GRPO_RDZV_PORT": str(free_port())}, ["--nodes=1"])
    text = _preempt_and_finish(jid, run, log, steps)
    assert text.count("vLLM servers ready: http://") == 2  # started again after the requeue
    assert text.count("initial weight sync") == 2  # the resumed trainer sent its checkpoint's weights
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["sync/checksum_ok"] == 1.0 and r["sync/canary_mean_abs"] < 1e-4 for r in recs if r["step"] > 0)
    assert not list(ROOT.glob(f".grpo-job-{jid}-*")), "the job's state directory was left behind"


def test_missing_recipe_fails_fast_with_a_clear_message(slurm, tmp_path):
    log = tmp_path / "job.out"
    jid = _sbatch("train.slurm", ["recipes/does-not-exist.yaml"], log)
    j = _wait(jid, ("COMPLETED", "FAILED"), timeout=120)
    assert j["JobState"] == "FAILED" and j["ExitCode"].startswith("2:")
    assert "recipe not found: recipes/does-not-exist.yaml" in log.read_text()


def test_eval_job(slurm, tmp_path, tiny_model_dir):
    log = tmp_path / "job.out"
    model = tmp_path / "m" / "final"
    shutil.copytree(tiny_model_dir, model)
    jid = _sbatch("eval.slurm", ["recipes/smollm2-135m-arith.yaml", str(model), "data.num_eval=6",
                                 "rollout.max_new_tokens=4", "eval.num_samples=2"], log)
    j = _wait(jid, ("COMPLETED", "FAILED"), timeout=300)
    assert j["JobState"] == "COMPLETED", log.read_text()[-3000:]
    rec = json.loads((tmp_path / "m" / f"eval-{jid}" / "metrics.jsonl").read_text())
    assert rec["eval/num_problems"] == 6 and "eval/pass@2" in rec


def test_doctor_job_two_ranks_zero3(slurm, tmp_path):
    """slurm/doctor.slurm on two CPU processes under ZeRO-3 with the embedded model: every check passes, and the
    collectives row measured a real all-reduce between the two ranks."""
    log = tmp_path / "job.out"
    jid = _sbatch("doctor.slurm", ["recipes/smollm2-135m-arith.yaml", f"output_dir={tmp_path / 'run'}",
                                   "deepspeed.zero_stage=3", "rollout.max_new_tokens=8"], log,
                  {"GRPO_NPROC": "2", "GRPO_DOCTOR_ARGS": "--keep"})
    j = _wait(jid, ("COMPLETED", "FAILED"), timeout=400)
    text = log.read_text()
    assert j["JobState"] == "COMPLETED", text[-4000:]
    assert "(2 rank(s) on cpu, rollout hf, ZeRO-3)" in text and "verdict: PASS" in text
    assert "over 2 rank(s) on cpu" in text and "bus bandwidth" in text
    assert "weights restored exactly" in text
    shards = list((tmp_path / "run" / "doctor" / "checkpoints" / "step-000001").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO-3 shard per rank
