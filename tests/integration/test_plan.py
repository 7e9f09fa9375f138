"""`grpo plan`: the parameter count against the real embedded model, and the CLI. (The terms by hand:
tests/unit/commands/test_plan.py; the prediction against a measured peak: tests/integration/test_embedded.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo.commands.plan import model_shape
from tests.helpers import RECIPE, ROOT


@pytest.mark.integration  # loads the embedded model
def test_parameter_count_matches_the_real_embedded_model(embedded_dir):
    from grpo.runtime.model import load_model

    real = sum(p.numel() for p in load_model(str(embedded_dir), "float32").parameters())
    assert model_shape(str(embedded_dir)).params() == real


@pytest.mark.integration
def test_cli(tmp_path):
    args = [sys.executable, "-m", "grpo", "plan", str(RECIPE), "model.path=Qwen/Qwen2.5-1.5B-Instruct",
            "model.dtype=bfloat16"]
    ok = subprocess.run([*args, "--gpu-memory", "80", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["fits"] is True
    bad = subprocess.run([*args, "optim.micro_batch_size=64", "--gpu-memory", "8"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 1 and "does NOT fit" in bad.stdout and "gradient_checkpointing" in bad.stdout
    missing = subprocess.run([sys.executable, "-m", "grpo", "plan", str(RECIPE), "model.path=/nonexistent/model"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "model.path" in missing.stderr
