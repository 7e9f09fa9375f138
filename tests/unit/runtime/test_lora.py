"""LoRA (model.lora.r > 0): the merged weights the engines get equal the adapted model's own forward, the plan
counts the adapters peft really creates, and resumes with changed adapter settings are refused. (Real runs:
tests/integration/test_lora.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch

from grpo.config import load_config
from tests.helpers import RECIPE


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:  # peft starts B at zero (a no-op adapter): make the merge matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.unit
def test_merged_weights_reproduce_the_adapted_forward(tiny_model_dir):
    from grpo.runtime import lora
    from grpo.runtime.model import load_model

    cfg = load_config(RECIPE, ["model.lora.r=4"])
    model = lora.apply(load_model(str(tiny_model_dir), "float32"), cfg.model.lora)
    _randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    merged = dict(lora.merged_parameters(model))
    plain = load_model(str(tiny_model_dir), "float32")
    assert set(merged) == {n for n, _ in plain.named_parameters()}  # HF names, nothing extra
    plain.load_state_dict(merged, strict=False)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(load_model(str(tiny_model_dir), "float32")(input_ids=ids).logits,
                                  plain(input_ids=ids).logits, atol=1e-3)  # the adapters changed something


@pytest.mark.unit
def test_qlora_merged_weights_are_the_dequantized_base_plus_the_adapters(vllm_tiny_dir):
    """A 4-bit base (bitsandbytes, real kernels on this CPU): the weights sent out are plain model-dtype tensors of
    the HF shapes, a plain model loaded with them computes what the quantized adapted model computes, and the base
    is nf4 as computed by hand (the nearest of 16 levels times each block's absmax). The model is the one with
    128-wide layers: bitsandbytes 0.50.2's CPU quantizer is off for tensors under 4096 values (3x nf4's error
    on a 32x32 weight), which no real model has."""
    from grpo.runtime import lora
    from grpo.runtime.model import load_model

    cfg = load_config(RECIPE, ["model.lora.r=4", "model.lora.quantize=nf4"])
    model = lora.apply(load_model(str(vllm_tiny_dir), "float32", quantize="nf4"), cfg.model.lora)
    _randomize_adapters(model)
    packed = [n for n, p in model.named_parameters() if p.dtype == torch.uint8]
    assert packed and all(n.endswith(".base_layer.weight") for n in packed)
    plain = load_model(str(vllm_tiny_dir), "float32")
    shapes = {n: (p.dtype, tuple(p.shape)) for n, p in plain.named_parameters()}
    dtype = lora.compute_dtype(model)
    assert {lora.hf_name(n): lora.logical_shape(p, dtype) for n, p in model.named_parameters()
            if lora.hf_name(n)} == shapes  # what the engines are told to expect
    merged = dict(lora.merged_parameters(model))
    assert {n: (t.dtype, tuple(t.shape)) for n, t in merged.items()} == shapes
    assert lora.weight_count(model, adapters=False) == sum(p.numel() for p in plain.parameters())  # export's check
    original = {n: p.detach().clone() for n, p in plain.named_parameters()}
    plain.load_state_dict(merged, strict=False)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits  # eval mode, no grad: where bitsandbytes would repack for its CPU kernel
        # the same fp32 weights both sides (dequantize, then an fp32 matmul), 2 layers of hidden 128: only the order
        # of fp32 sums differs, about 1e-6 on any CPU; bitsandbytes' bf16 kernel, had it run, would be off by 1e-2
        assert torch.allclose(ours, plain(input_ids=ids).logits, atol=1e-4), (ours - plain(input_ids=ids).logits)
        again = dict(lora.merged_parameters(model))  # the layout is unchanged after that forward
        assert all(torch.equal(again[n], merged[n]) for n in merged)
    levels = torch.tensor([-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461,
                           0.3379, 0.4407, 0.5626, 0.7230, 1])  # NF4, from the QLoRA paper
    params = dict(model.named_parameters())
    for name in packed:
        w = original[name.replace(".base_layer.", ".")]
        blocks = w.reshape(-1, 64)
        scale = blocks.abs().amax(1, keepdim=True)
        by_hand = (levels[(blocks / scale).unsqueeze(-1).sub(levels).abs().argmin(-1)] * scale).reshape(w.shape)
        base = lora.base_weight(params[name], dtype)
        # equal but for the 8-bit double quantization of the block scales: a few percent of nf4's own error. No
        # CPU-dependent rounding here: absmax, the nearest code and the scales' 8-bit codes come from comparisons and
        # elementwise arithmetic, which give the same bits on any CPU
        off, nf4_error = float((base - by_hand).abs().mean()), float((by_hand - w).abs().mean())
        assert off < 0.05 * nf4_error, (name, off, nf4_error)


@pytest.mark.unit
def test_qlora_refusals_name_the_key(monkeypatch):
    import sys

    from grpo.config import ConfigError
    from grpo.runtime.model import four_bit_config

    with pytest.raises(ConfigError, match=r"model.lora.quantize: a 4-bit base is frozen: it needs LoRA adapters"):
        load_config(RECIPE, ["model.lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="model.lora.quantize"):
        load_config(RECIPE, ["model.lora.r=8", "model.lora.quantize=int3"])
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # as if bitsandbytes were not installed
    with pytest.raises(ConfigError, match=r"model.lora.quantize=nf4: needs bitsandbytes \(pip install"):
        four_bit_config("nf4", torch.float32)


@pytest.mark.unit
def test_plan_counts_the_adapters_peft_creates(embedded_dir):
    """SmolLM2-135M, r=16 on all linear layers: 30 layers x 16 x (2x1152 + 2x768 + 3x2112) = 4,884,480 by hand,
    and the same counted on the model after injection; the plan's optimizer states shrink accordingly."""
    from grpo.commands.plan import lora_params, model_shape, plan
    from grpo.runtime import lora
    from grpo.runtime.model import load_model

    cfg = load_config(RECIPE, ["model.lora.r=16"])
    shape = model_shape(cfg.model.path)
    assert lora_params(shape, 16, "all-linear") == 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112) == 4_884_480
    model = lora.apply(load_model(str(embedded_dir), "float32"), cfg.model.lora)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == 4_884_480
    assert lora_params(shape, 8, ["q_proj", "v_proj"]) == 30 * 8 * (1152 + 768)
    assert lora_params(shape, 8, "q_proj") == 30 * 8 * 1152  # one name as a string
    full, adapted = plan(load_config(RECIPE), 1, None).terms_gib, plan(cfg, 1, None).terms_gib
    assert adapted["optimizer states"] == pytest.approx(full["optimizer states"] * 4_884_480 / shape.params())
    assert adapted["weights"] > full["weights"]


@pytest.mark.unit
def test_lora_with_zero3_is_refused_by_name():
    from grpo.config import ConfigError

    with pytest.raises(ConfigError, match="model.lora.r: LoRA runs with deepspeed.zero_stage 0-2"):
        load_config(RECIPE, ["model.lora.r=8", "deepspeed.zero_stage=3"])


@pytest.mark.unit
def test_checkpoints_from_before_the_sft_keys_still_resume(tmp_path):
    """A checkpoint's saved config without the sft section (written before it existed) is not a changed sft.data."""
    from grpo.config import ConfigError, to_dict
    from grpo.runtime.checkpoint import check_compatible

    current = to_dict(load_config(RECIPE))
    saved = {k: v for k, v in current.items() if k != "sft"}
    check_compatible(saved, current, tmp_path)
    changed = json.loads(json.dumps(current))
    changed["sft"]["batch_size"] = 64
    with pytest.raises(ConfigError, match="different sft.batch_size"):
        check_compatible(changed, current, tmp_path)


@pytest.mark.unit
def test_a_resume_with_changed_lora_settings_is_refused_by_key(tmp_path):
    """A LoRA checkpoint loads non-strictly (it holds the adapters only), so a resume that changed the adapters'
    set-up or the base's quantization would go on silently with mismatched state: refused, naming the key."""
    from grpo.config import ConfigError, to_dict
    from grpo.runtime.checkpoint import check_compatible

    saved = to_dict(load_config(RECIPE, ["model.lora.r=8", "model.lora.quantize=nf4"]))
    check_compatible(saved, json.loads(json.dumps(saved)), tmp_path)
    for override, named in (("model.lora.quantize=none", "quantize: nf4 -> none"), ("model.lora.r=16", "r: 8 -> 16"),
                            ("model.lora.target_modules=[q_proj]", "target_modules")):
        current = to_dict(load_config(RECIPE, ["model.lora.r=8", "model.lora.quantize=nf4", override]))
        with pytest.raises(ConfigError, match=f"different model.lora .*{re.escape(named)}"):
            check_compatible(saved, current, tmp_path)
    old = json.loads(json.dumps(saved))
    del old["model"]["lora"]  # written before model.lora existed: nothing to compare with
    check_compatible(old, to_dict(load_config(RECIPE)), tmp_path)
