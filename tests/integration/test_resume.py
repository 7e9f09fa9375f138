"""Preemption and crashes: SIGTERM checkpoints and exits for a requeue, SIGKILL loses nothing past the last
checkpoint, damaged checkpoints are skipped, a changed configuration is refused. Resumed runs must reproduce the
uninterrupted run's per-step rewards and losses exactly (CPU, same seeds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import RECIPE, ROOT, metrics, run_cli, tiny_overrides

pytestmark = pytest.mark.integration

STEPS = 6
KEYS = ("reward/mean", "loss/pg", "entropy", "completion/len_mean", "grad_norm")


def _args(model, run, **kw):
    return tiny_overrides(model, run, **{"steps": STEPS, "checkpoint.keep": 2, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("ref") / "run"
    p = run_cli(_args(tiny_model_dir, run))
    assert p.returncode == 0, p.stderr[-2000:]
    return {r["step"]: r for r in metrics(run)}


def _same_as_reference(run: Path, reference: dict) -> None:
    got = metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    for r in got:
        for k in KEYS:
            assert r[k] == pytest.approx(reference[r["step"]][k], rel=1e-5, abs=1e-7), (r["step"], k)


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "grpo", "train", str(RECIPE), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        f = run / "metrics.jsonl"
        if f.exists() and any(json.loads(x).get("step", 0) >= step for x in f.read_text().splitlines() if x.strip()
                              and x.rstrip().endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_for_requeue(tmp_path, tiny_model_dir, reference, sig):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, run, **{"checkpoint.every": 100})  # only the signal makes a checkpoint
    proc = _start(args)
    _wait_for_step(run, 2, proc)
    proc.send_signal(sig)
    proc.send_signal(sig)  # signals arrive twice
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 85, err[-2000:]
    assert "stopped by signal after step" in err
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and int(ckpts[0].split("-")[1]) < STEPS
    p = run_cli(args)
    assert p.returncode == 0, p.stderr[-2000:]
    _same_as_reference(run, reference)


def test_sigkill_resumes_exactly(tmp_path, tiny_model_dir, reference):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, run, **{"checkpoint.every": 1})
    proc = _start(args)
    _wait_for_step(run, 3, proc)
    proc.kill()
    proc.communicate()
    assert not (run / "final").exists()
    p = run_cli(args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr
    _same_as_reference(run, reference)


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_model_dir, reference):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, run, **{"checkpoint.every": 1})
    assert run_cli(args[:] + ["steps=4"]).returncode == 0
    states = list((run / "checkpoints" / "step-000004" / "state").glob("*model_states.pt"))
    assert states
    states[0].write_bytes(b"\0" * 100)  # a torn write
    (run / "checkpoints" / ".staging-000005").mkdir()  # an interrupted save: never picked
    p = run_cli(args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step-000004 could not be loaded" in p.stderr and "resumed from" in p.stderr
    assert "step-000003" in p.stderr.split("resumed from")[1].splitlines()[0]
    _same_as_reference(run, reference)
    kept = sorted(x.name for x in (run / "checkpoints").glob("step-*"))
    assert kept == ["step-000005", "step-000006"]  # the last two, never fewer


def test_changed_configuration_is_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    assert run_cli(_args(tiny_model_dir, run, steps=2)).returncode == 0
    p = run_cli(_args(tiny_model_dir, run, steps=3, **{"rollout.num_generations": 2, "optim.micro_batch_size": 2}))
    assert p.returncode == 2
    assert "different rollout.num_generations" in p.stderr and "Traceback" not in p.stderr


def test_explicit_resume_path_must_be_complete(tmp_path, tiny_model_dir):
    p = run_cli(_args(tiny_model_dir, tmp_path / "run", **{"checkpoint.resume": str(tmp_path / "nothing")}))
    assert p.returncode == 2 and "is not a complete checkpoint" in p.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 56 MB tmpfs: room for one checkpoint of the tiny model (37 MB: weights and Adam states of its 3.2M
    parameters, the head untied), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=56M", "tmpfs", str(disk)], capture_output=True, text=True)
    if p.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs (CI runs as root): {p.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.root
def test_full_disk_during_save_loses_nothing(small_disk, tiny_model_dir, reference):
    run = small_disk / "run"
    args = _args(tiny_model_dir, run, **{"checkpoint.every": 1})
    p = run_cli(args)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "could not write the checkpoint of step 2" in p.stderr and "the file system is full" in p.stderr
    assert "step-000001, is intact" in p.stderr and "Traceback" not in p.stderr
    ckpts = run / "checkpoints"
    assert sorted(x.name for x in ckpts.iterdir()) == ["step-000001"]  # the half-written one was removed
    # space comes back (a bigger quota, files moved away): the same command resumes from step 1, exactly
    subprocess.run(["mount", "-o", "remount,size=400M", str(small_disk)], check=True)
    p = run_cli(args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step-000001 at step 1" in p.stderr
    _same_as_reference(run, reference)


def test_schedule_changes_on_resume_are_refused(tmp_path, tiny_model_dir):
    """The LR schedule resumes from the checkpoint's state: under a cosine schedule a longer `steps` moves the
    horizon (the LR would jump), and a changed optim.lr would be silently ignored; both are refused by name. With
    a constant schedule, extending `steps` resumes (tested above)."""
    run = tmp_path / "run"
    cosine = {"optim.schedule": "cosine", "optim.warmup_steps": 1}
    assert run_cli(_args(tiny_model_dir, run, steps=2, **cosine)).returncode == 0
    p = run_cli(_args(tiny_model_dir, run, steps=4, **cosine))
    assert p.returncode == 2 and "different steps" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(_args(tiny_model_dir, run, steps=2, **{**cosine, "optim.lr": 5e-4}))
    assert p.returncode == 2 and "different optim.lr" in p.stderr


# ------------------------------------------------------------------------------------------ two ranks (ZeRO-2)

STEPS2 = 4


def _launcher() -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _args2(model, run, **kw):
    return tiny_overrides(model, run, **{"steps": STEPS2, "checkpoint.every": 1, "checkpoint.keep": 3,
                                         "deepspeed.zero_stage": 2, "rollout.prompts_per_step": 2, **kw})


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("ref2") / "run"
    p = run_cli(_args2(tiny_model_dir, run), launcher=_launcher(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return {r["step"]: r for r in metrics(run)}


def _same2(run: Path, reference: dict) -> None:
    got = metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS2 + 1)), "a step was lost or repeated"
    for r in got:
        for k in KEYS:
            assert r[k] == pytest.approx(reference[r["step"]][k], rel=1e-5, abs=1e-7), (r["step"], k)


def _start2(args: list[str], marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    if marker is not None:
        env["GRPO_PREEMPT_MARKER"] = str(marker)
    return subprocess.Popen([*_launcher(), "-m", "grpo", "train", str(RECIPE), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_ranks_sigkill_then_damage_on_one_rank_then_world_size(tmp_path, tiny_model_dir, reference2):
    """Two ZeRO-2 ranks: SIGKILL of the whole job mid-run, then the resumed run equals the uninterrupted one; then
    rank 1's optimizer shard of the newest checkpoint is torn: both ranks agree to fall back to the previous
    checkpoint; then a resume with one process is refused by name (ZeRO shards do not reshard)."""
    run = tmp_path / "run"
    args = _args2(tiny_model_dir, run)
    proc = _start2(args)
    _wait_for_step(run, 2, proc, timeout=400)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    p = run_cli(args, launcher=_launcher(), timeout=600)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    _same2(run, reference2)

    shard = run / "checkpoints" / f"step-{STEPS2:06d}" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard.is_file(), sorted(x.name for x in shard.parent.iterdir())
    shard.write_bytes(b"\0" * 64)
    p = run_cli(args[:] + [f"steps={STEPS2 + 1}"], launcher=_launcher(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"step-{STEPS2:06d} could not be loaded on every rank" in p.stderr
    assert f"step-{STEPS2 - 1:06d}" in p.stderr.split("resumed from")[1].splitlines()[0]

    p = run_cli(args[:] + [f"steps={STEPS2 + 2}"], timeout=300)
    assert p.returncode == 2 and "written by 2 ranks, this run has 1" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_signal_to_one_rank_only(tmp_path, tiny_model_dir, reference2):
    """SIGTERM reaches rank 1 alone (a node's share of a job): the ranks agree at the step boundary, checkpoint
    together and stop for a requeue; the resumed run equals the uninterrupted one."""
    run = tmp_path / "run"
    args = _args2(tiny_model_dir, run, **{"checkpoint.every": 100})
    marker = tmp_path / "preempted"
    proc = _start2(args, marker)
    _wait_for_step(run, 1, proc, timeout=400)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in workers:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=")[1] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    assert set(ranks) == {0, 1}, workers
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=400)
    assert marker.is_file(), err[-3000:]  # the trainer's preemption exit (torchrun reports 85 as 1)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and int(ckpts[0].split("-")[1]) < STEPS2, ckpts
    p = run_cli(args, launcher=_launcher(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    _same2(run, reference2)


# The last commit of the flat grpo/ layout, before the packages of issue 26: checkpoints users hold were written by it.
FLAT_LAYOUT = "1bb0f35"


def _old_tree(dest: Path) -> Path | None:
    """The flat layout's code, from this checkout's history (None where there is no history: a shallow clone)."""
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"], capture_output=True).returncode:
        return None
    dest.mkdir()
    archive = subprocess.run([*git, "archive", FLAT_LAYOUT, "grpo", "rewards", "tests", "recipes"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def test_checkpoint_written_before_the_package_layout_resumes_exactly(tmp_path, tiny_model_dir):
    """A checkpoint written by the code of the flat layout (the commit before the packages) resumes under today's
    code, and the resumed steps are exactly the ones the old code ran after it (same machine, same seeds)."""
    old = _old_tree(tmp_path / "old")
    if old is None:
        pytest.skip(f"commit {FLAT_LAYOUT} is not in this checkout's history (a shallow clone)")
    run = tmp_path / "run"
    args = _args(tiny_model_dir, run, **{"steps": 4, "checkpoint.keep": 4})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(old)}
    p = subprocess.run([sys.executable, "-m", "grpo", "train", str(old / "recipes" / RECIPE.name), *args], cwd=old,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (old / "grpo" / "train.py").is_file() and not (old / "grpo" / "loop").exists()  # the flat layout ran
    before = {r["step"]: r for r in metrics(run)}
    assert sorted(before) == [1, 2, 3, 4]
    for late in ("step-000003", "step-000004"):  # as if the old run had stopped after step 2
        shutil.rmtree(run / "checkpoints" / late)
    p = run_cli(args)  # today's code: resumes from the old step-2 checkpoint
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr and "step-000002" in p.stderr
    after = metrics(run)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for r in after[2:]:
        for k in KEYS:
            assert r[k] == pytest.approx(before[r["step"]][k], rel=1e-5, abs=1e-7), (r["step"], k)
