"""bf16 training keeps fp32 gradient sums and master weights (DeepSpeed's BF16_Optimizer), with a real DeepSpeed
engine on CPU. At ZeRO stage 0 DeepSpeed used to run bf16 through its FP16 unfused optimizer, which sums the
micro-batches' gradients in bf16."""

from __future__ import annotations

import subprocess
import sys

import pytest

from grpo.commands.plan import plan
from grpo.config import load_config
from grpo.runtime.deepspeed_setup import ds_config
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed
from grpo.config import load_config
from grpo.runtime.deepspeed_setup import ds_config, init_distributed
from grpo.runtime.model import load_model
init_distributed("cpu")
cfg = load_config({recipe!r}, ["model.path=" + sys.argv[1], "model.dtype=bfloat16", "deepspeed.zero_stage=0"])
model = load_model(sys.argv[1], "bfloat16")
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config(cfg, 2, 4))
print("OPTIMIZER", type(engine.optimizer).__name__)
"""


def test_bf16_sums_gradients_in_fp32(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    recipe = str(ROOT / "recipes" / "smollm2-135m-arith.yaml")
    script = tmp_path / "engine.py"
    script.write_text(SCRIPT.format(root=str(ROOT), recipe=recipe))
    p = subprocess.run([sys.executable, str(script), str(tiny_model_dir), port], capture_output=True, text=True,
                       timeout=300)
    assert "OPTIMIZER BF16_Optimizer" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    cfg = load_config(recipe, ["model.dtype=bfloat16"])
    assert ds_config(cfg, 2, 4)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds_config(cfg, 2, 4)["communication_data_type"] == "fp32"  # BF16_Optimizer averages its fp32 sums
    offload = load_config(recipe, ["model.dtype=bfloat16", "deepspeed.zero_stage=1",
                                   "deepspeed.offload_optimizer=true"])
    assert "communication_data_type" not in ds_config(offload, 2, 4)  # ZeRO-1's optimizer: bf16 buckets
    assert "data_types" not in ds_config(load_config(recipe), 2, 4)  # fp32 needs none
    terms = plan(cfg, 1, None).terms_gib
    assert "fp32 gradient accumulation" in terms


FP16_SCRIPT = r"""
import os, sys, types
sys.path.insert(0, {root!r})
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import torch
from grpo.runtime.deepspeed_setup import init_distributed
from grpo.runtime.deepspeed_setup import stage0_grad_norm
init_distributed("cpu")
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
lin = torch.nn.Linear(3, 2).half()
opt = FP16_UnfusedOptimizer(torch.optim.AdamW(lin.parameters()), static_loss_scale=1024.0, clip_grad=1e9)
for p in lin.parameters():
    p.grad = torch.full_like(p, 0.5 * 1024)  # what backward leaves under a loss scale of 1024
engine = types.SimpleNamespace(optimizer=opt, fp16_enabled=lambda: True, module=lin)
ours = stage0_grad_norm(engine)
opt.step()
print("NORMS", ours, opt._global_grad_norm)
"""


@pytest.mark.numerics
def test_fp16_stage0_grad_norm_is_unscaled(tmp_path):
    """At ZeRO stage 0, fp16 runs DeepSpeed's FP16_UnfusedOptimizer (torch's AdamW is not its fused Adam), which
    records the norm of the loss-scaled gradients; the logged norm divides the scale out. DeepSpeed refuses fp16 on
    this CPU, so its optimizer is built directly (a real one) around fp16 gradients as backward leaves them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "fp16.py"
    script.write_text(FP16_SCRIPT.format(root=str(ROOT)))
    p = subprocess.run([sys.executable, str(script), port], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("NORMS")), None)
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    ours, deepspeeds = map(float, line.split()[1:])
    true = 0.5 * (2 * 3 + 2) ** 0.5  # 8 gradient entries of 0.5
    assert abs(ours - true) < 1e-6
    assert abs(deepspeeds - 1024 * true) < 1e-3  # why DeepSpeed's own figure is not used at stage 0


LEAN_SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from grpo.config import load_config
from grpo.runtime.deepspeed_setup import build_policy_engine, init_distributed
from grpo.runtime.model import load_model
init_distributed("cpu")
flattened = []
fallback = DeepSpeedEngine.buffered_allreduce_fallback
def spy(self, *a, **k):
    flattened.append(1)
    return fallback(self, *a, **k)
DeepSpeedEngine.buffered_allreduce_fallback = spy
for dtype in ("float32", "bfloat16"):
    flattened.clear()
    cfg = load_config({recipe!r}, ["model.path=" + sys.argv[1], "model.dtype=" + dtype, "deepspeed.zero_stage=0",
                                   "optim.lr=0.01", "optim.warmup_steps=0"])  # steps that bf16 can hold
    engine = build_policy_engine(load_model(sys.argv[1], dtype), cfg, 1, 1)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    engine.backward(engine(torch.tensor([[1, 5, 9, 13]])).logits.float().square().mean())
    engine.step()
    moved = sum(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))
    print("RESULT", dtype, type(engine.optimizer).__name__, len(flattened), moved, len(before))
"""


def test_one_rank_skips_deepspeeds_flattened_gradient_copy(tiny_model_dir, tmp_path):
    """With one rank DeepSpeed's fallback all-reduce (stage 0, and BF16_Optimizer's stage 1: every bf16 recipe)
    only flattens a full copy of the gradients: deepspeed_setup.lean_stage0_allreduce skips it, and the step still
    updates every parameter."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "lean.py"
    script.write_text(LEAN_SCRIPT.format(root=str(ROOT), recipe=str(ROOT / "recipes" / "smollm2-135m-arith.yaml")))
    p = subprocess.run([sys.executable, str(script), str(tiny_model_dir), port], capture_output=True, text=True,
                       timeout=300)
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 2, p.stdout[-2000:] + p.stderr[-3000:]
    for dtype, optimizer, flattened, moved, total in rows:
        assert flattened == "0", (dtype, optimizer)
        assert moved == total, (dtype, moved, total)
    assert [r[1] for r in rows][1] == "BF16_Optimizer"


@pytest.mark.numerics
def test_two_ranks_average_bf16_gradient_sums_in_fp32(tiny_model_dir):
    """bf16 on two ranks: BF16_Optimizer's fp32 gradient sums are averaged over the ranks in fp32. DeepSpeed's
    default casts them to bf16 for the all-reduce (communication_data_type follows bf16), so one rank and several
    stepped on differently rounded gradients. tests/bf16_allreduce_worker.py checks the averaged sums against the
    exact fp32 mean of both ranks' sums, gathered separately."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                        str(ROOT / "tests" / "bf16_allreduce_worker.py"), str(tiny_model_dir),
                        str(ROOT / "recipes" / "smollm2-135m-arith.yaml")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} optimizer BF16_Optimizer" in p.stdout and f"rank {rank} done" in p.stdout, p.stdout
