"""The benchmark scripts stay runnable: each on a tiny configuration (figures are not asserted; they are measured
by running the scripts, see README.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT


def test_train_phase_runs_both_paths(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_phase.py"), "--layers", "1", "--hidden",
                        "64", "--inter", "128", "--heads", "2", "--kv-heads", "1", "--vocab", "4096", "--prompts", "2",
                        "--group", "2", "--prompt-len", "8", "--completion", "8", "--micro", "2", "--reps", "1",
                        "--lengths", "fixed", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("ours", "trl"):
        assert res[k]["seconds"] > 0 and res[k]["peak_gib"] > 0
        assert res[k]["tokens_per_s"] == 2 * 2 * 8 / res[k]["seconds"]
    assert math.isfinite(res["ratio_tokens_per_s"]) and "ours/TRL" in p.stdout
    # the same loss on the same weights and batch: the same gradient (fp32), so the race is fair
    assert abs(res["ours"]["grad_norm"] - res["trl"]["grad_norm"]) <= 1e-4 * res["trl"]["grad_norm"]
