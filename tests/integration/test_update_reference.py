"""The update's gradient checked for size: `grpo.loop.update.update` on hand-built groups (lengths 1 to 9, a NaN total,
micro-batches with different token counts, several vocabulary chunks) against an independent float64 reference,
for token, sequence and constant aggregation, plain, with KL, with importance weights that cut, and with tool
spans masked out of every term (KL and importance weights on); then the same
groups split unevenly over two ranks at ZeRO-0, 2 and 3. Adam is nearly scale-invariant, so a wrong `* world`, a
wrong accumulation scale or swapped normalisers train about as well and only a check of the gradient's size
catches them. The worker (tests/update_reference_worker.py) documents the reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import RECIPE, ROOT

pytestmark = pytest.mark.integration

CASES = {f"{a}/{v}{s}" for a in ("token", "sequence", "constant") for v in ("plain", "kl", "tis", "tools")
         for s in ("", "/step2")}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path, model_dir, ranks: int, stage: int) -> dict[str, list[float]]:
    out = tmp_path / f"norms-{ranks}-{stage}.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_port()), str(ROOT / "tests" / "update_reference_worker.py"), str(model_dir), str(RECIPE),
           str(stage), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


def check(norms: dict[str, list[float]]) -> None:
    assert set(norms) == CASES
    for case, (ours, ref) in norms.items():
        assert ref > 1e-3, case  # the reference is not trivially zero
        # fp32 against float64: the norm sums a few thousand squared terms, each from reductions of at most a few
        # hundred products, so the relative error is about sqrt(n) * 6e-8 (a few 1e-6) whatever the kernels' order
        # and width (AVX2 or AVX-512); 2e-4 leaves two orders of magnitude, and a wrong scale is off by >= 1/9
        assert abs(ours - ref) <= 2e-4 * ref, f"{case}: update's grad norm {ours:.8g}, reference {ref:.8g}"
    # the variants differ from each other, so each one's check means something
    for agg in ("token", "sequence", "constant"):
        vals = [norms[f"{agg}/{v}"][1] for v in ("plain", "kl", "tis", "tools")]
        assert len({round(v, 6) for v in vals}) == 4, (agg, vals)


@pytest.mark.numerics
def test_update_gradient_matches_reference_one_rank(tmp_path, tiny_model_dir):
    check(run_worker(tmp_path, tiny_model_dir, 1, 0))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_update_gradient_matches_reference_two_uneven_ranks(tmp_path, tiny_model_dir, stage):
    check(run_worker(tmp_path, tiny_model_dir, 2, stage))
