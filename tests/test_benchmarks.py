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


def test_train_phase_model_flops_by_hand():
    """1 layer, hidden 2, 10 parameters; one prompt of 2 tokens with completions of 1 and 2 tokens, one
    micro-batch. TRL: 6*10*3 + 12*2*9/2 = 288 and 6*10*4 + 12*2*16/2 = 432. Ours: 6*10*(2+3) = 300 for the
    tokens, and 24 x (4/2 + (1*2 + 1/2) + (2*2 + 4/2)) = 252 for attention."""
    from benchmarks.train_phase import model_flops

    assert model_flops(10, 1, 2, 2, [1, 2], 2, 2) == {"trl": 720, "ours": 552}
    # micro-batches of 1: the prompt runs twice, 2 x (6*10*2 + 24*2) more than once
    assert model_flops(10, 1, 2, 2, [1, 2], 2, 1)["ours"] == 552 + 6 * 10 * 2 + 24 * 2
