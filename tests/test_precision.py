"""bf16 training keeps fp32 gradient sums and master weights (DeepSpeed's BF16_Optimizer), with a real DeepSpeed
engine on CPU. At ZeRO stage 0 DeepSpeed used to run bf16 through its FP16 unfused optimizer, which sums the
micro-batches' gradients in bf16."""

from __future__ import annotations

import subprocess
import sys

from grpo.config import load_config
from grpo.engine import ds_config
from grpo.plan import plan
from tests.conftest import ROOT

SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed
from grpo.config import load_config
from grpo.engine import ds_config, init_distributed
from grpo.model import load_model
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
    assert "data_types" not in ds_config(load_config(recipe), 2, 4)  # fp32 needs none
    terms = plan(cfg, 1, None).terms_gib
    assert "fp32 gradient accumulation" in terms
