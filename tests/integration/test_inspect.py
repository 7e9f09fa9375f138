"""Rollout inspection: the shared readers, `grpo inspect`, and the notebook executed with a real kernel. (pass@k by
hand and the notebook's builder: tests/unit/commands/test_inspect.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from grpo.commands.view import RunError, group_summary, group_table, load_run, pass_at_k_table
from tests.helpers import ROOT, execute_notebook, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("inspect") / "run"
    p = run_cli(tiny_overrides(tiny_model_dir, run, steps=3, **{
        "eval.every": 2, "eval.at_start": True, "eval.num_samples": 3}))
    assert p.returncode == 0, p.stderr[-3000:]
    return run


@pytest.mark.integration
def test_readers_on_a_real_run(tiny_run):
    run = load_run(tiny_run)
    assert sorted(run.rollouts["step"].unique()) == [1, 2, 3]
    assert "tests.helpers:length_reward" in run.reward_names
    g = group_summary(run)
    assert len(g) == 2 and set(g["step"]) == {3}
    # the zero-variance flag agrees with the records themselves
    for _, row in g.iterrows():
        vals = run.rollouts[(run.rollouts["step"] == 3) & (run.rollouts["prompt_id"] == row["prompt_id"])]
        assert row["zero_variance"] == (vals["reward_total"].nunique() == 1)
    t = group_table(run, 3, g["prompt_id"].iloc[0])
    assert len(t) == 4 and {"completion", "advantage", "finish_reason"} <= set(t.columns)
    assert run.rollouts["trainer_logprob_mean"].notna().all()
    pk = pass_at_k_table(run.evals)
    assert set(pk["k"]) == {1, 2, 3} and set(pk["step"]) == {0, 2, 3}
    m = run.metrics.set_index("step")
    assert "eval/pass@3" in m.columns


@pytest.mark.integration
def test_inspect_cli(tiny_run):
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "grpo", "inspect", str(tiny_run), "--top", "1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "worst group at step 3" in p.stdout and "best group at step 3" in p.stdout
    assert "eval pass@k" in p.stdout
    pid = load_run(tiny_run).rollouts["prompt_id"].iloc[0]
    p = subprocess.run([sys.executable, "-m", "grpo", "inspect", str(tiny_run), "--step", "1", "--prompt", pid],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and pid in p.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "file"])
@pytest.mark.integration
def test_bad_run_dirs_give_a_message_not_a_traceback(tmp_path, case):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    if case == "file":
        target.write_text("hi")
    p = subprocess.run([sys.executable, "-m", "grpo", "inspect", str(target)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stdout + p.stderr
    assert str(target) in p.stdout


@pytest.mark.integration
def test_run_still_being_written(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    (copy / "rollouts" / "step-000004.parquet.tmp").write_bytes(b"PAR1 half written")
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # torn last line
    run = load_run(copy)
    assert run.metrics["step"].max() == 3 and run.rollouts["step"].max() == 3


@pytest.mark.integration
def test_old_schema_is_refused_clearly(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    f = copy / "rollouts" / "step-000001.parquet"
    df = pd.read_parquet(f)
    df["schema_version"] = 0
    df.to_parquet(f)
    with pytest.raises(RunError, match="schema version"):
        load_run(copy)


@pytest.mark.integration
def test_notebook_runs_top_to_bottom(tiny_run):
    code = execute_notebook(tiny_run)
    assert all(c.execution_count is not None for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pngs == 4  # curves, length/reward, engine/trainer logprobs, pass@k
