"""`grpo plan`: parameter counts against published figures, the ZeRO sharding of each term by hand, the advice, and
the shipped recipes. (The CLI and the embedded model's real count: tests/integration/test_plan.py; the
prediction against a measured peak: tests/integration/test_embedded.py.)"""

from __future__ import annotations

import pytest

from grpo.commands.plan import GIB, model_shape, plan
from grpo.config import ConfigError, load_config
from tests.helpers import RECIPE, ROOT


@pytest.mark.parametrize("name,count", [
    ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),  # the model card's 1.54B, exactly
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),  # 7.61B
])
@pytest.mark.unit
def test_parameter_counts_match_published_figures(name, count):
    assert model_shape(name).params() == count


def _cfg(*over):
    return load_config(RECIPE, ["model.path=Qwen/Qwen2.5-1.5B-Instruct", "model.dtype=bfloat16", *over])


@pytest.mark.unit
def test_zero_stages_shard_the_right_terms():
    P = 1_543_714_304
    p0 = plan(_cfg("deepspeed.zero_stage=0"), 8, 80).terms_gib
    assert p0["weights"] == pytest.approx(2 * P / GIB)
    assert p0["gradients"] == pytest.approx(2 * P / GIB)
    # fp32 master + m + v under bf16, sharded: bf16 at stage 0 runs as stage 1 (BF16_Optimizer)
    assert p0["optimizer states"] == pytest.approx(12 * P / 8 / GIB)
    p1 = plan(_cfg("deepspeed.zero_stage=1"), 8, 80).terms_gib
    assert p1["optimizer states"] == pytest.approx(12 * P / 8 / GIB) and p1["gradients"] == p0["gradients"]
    p2 = plan(_cfg("deepspeed.zero_stage=2"), 8, 80).terms_gib
    assert p2["gradients"] == pytest.approx(2 * P / 8 / GIB) and p2["weights"] == p0["weights"]
    p3 = plan(_cfg("deepspeed.zero_stage=3"), 8, 80).terms_gib
    assert p3["weights"] == pytest.approx(2 * P / 8 / GIB) and "zero-3 gathered layers" in p3
    off = plan(_cfg("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"), 8, 80).terms_gib
    assert off["optimizer states"] == 0.0
    fp32 = plan(load_config(RECIPE, ["model.path=Qwen/Qwen2.5-1.5B-Instruct"]), 1, 80).terms_gib
    assert fp32["optimizer states"] == pytest.approx(8 * P / GIB)  # m + v beside fp32 weights


@pytest.mark.unit
def test_activations_by_hand_and_checkpointing_shrinks_them():
    padded = ("optim.layout=padded", "optim.micro_batch_size=4", "rollout.max_new_tokens=100")
    s = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    tokens = 4 * 256
    p = plan(_cfg(*padded), 1, 80, prompt_tokens=156).terms_gib
    act = p["activations (one micro-batch)"]
    assert act == pytest.approx(tokens * s.layers * 2 * (8 * 1536 + 4 * 8960) / GIB)
    assert "prefix attention" not in p
    ck = plan(_cfg(*padded, "model.gradient_checkpointing=true"), 1, 80,
              prompt_tokens=156).terms_gib["activations (one micro-batch)"]
    assert ck == pytest.approx(tokens * (28 * 1536 * 2 + 2 * (8 * 1536 + 4 * 8960)) / GIB)
    assert ck < act / 10


@pytest.mark.unit
def test_prefix_layout_activations_by_hand():
    """4 sequences of groups of 8 hold at most 2 distinct prompts: 2 x 156 + 4 x 100 = 712 tokens. The prefix
    attention adds, per layer, the gathered keys and values (4 x 256 slots x 1536, expanded on CUDA) and queries
    and outputs (4 x 100 x 1536), in bf16, plus the mask and its bias (4 x 100 x 256 x 3 bytes)."""
    over = ("optim.micro_batch_size=4", "rollout.max_new_tokens=100")
    p = plan(_cfg(*over), 1, 80, prompt_tokens=156).terms_gib
    assert p["activations (one micro-batch)"] == pytest.approx(712 * 28 * 2 * (8 * 1536 + 4 * 8960) / GIB)
    work = 2 * (2 * 4 * 256 * 1536 + 2 * 4 * 100 * 1536) + 4 * 100 * 256 * 3
    assert p["prefix attention"] == pytest.approx(28 * work / GIB)
    ck = plan(_cfg(*over, "model.gradient_checkpointing=true"), 1, 80, prompt_tokens=156).terms_gib
    assert ck["prefix attention"] == pytest.approx(work / GIB)  # one layer at a time
    cpu = plan(_cfg(*over, "model.gradient_checkpointing=true"), 1, None, prompt_tokens=156, device="cpu")
    kv = 2 * 128  # CPU keeps the 2 grouped kv heads of 128
    assert cpu.terms_gib["prefix attention"] == pytest.approx(
        (2 * (2 * 4 * 256 * kv + 2 * 4 * 100 * 1536) + 4 * 100 * 256 * 3) / GIB)
    one = plan(_cfg("optim.micro_batch_size=1", "rollout.max_new_tokens=100"), 1, 80, prompt_tokens=156)
    assert one.terms_gib["activations (one micro-batch)"] == pytest.approx(256 * 28 * 2 * (8 * 1536 + 4 * 8960) / GIB)


@pytest.mark.unit
def test_colocated_vllm_holds_its_share_while_sampling():
    p = plan(_cfg("rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.3"), 1, 80)
    assert p.terms_gib["colocated vLLM (while sampling)"] == pytest.approx(24.0)
    t = p.terms_gib  # bf16 at stage 1: BF16_Optimizer's fp32 gradient sums are held too (they were once left out)
    static = t["weights"] + t["gradients"] + t["fp32 gradient accumulation"] + t["optimizer states"] + 1.0
    assert p.generation_gib == pytest.approx(static + 24.0)
    update = static + t["activations (one micro-batch)"] + t["prefix attention"] + t["logprob chunks"]
    assert p.update_gib == pytest.approx(update)


@pytest.mark.unit
def test_cpu_reserve_is_the_figure_given_and_moves_both_peaks_by_it():
    """`grpo doctor` puts its own process's library RSS in place of the CPU reserve measured once: the term is that
    figure, and each phase's peak moves by exactly the difference. On CUDA the figure is ignored."""
    cfg = _cfg("device=cpu", "model.dtype=float32", "deepspeed.zero_stage=0")
    base = plan(cfg, 1, None, device="cpu")
    here = plan(cfg, 1, None, device="cpu", cpu_reserve_gib=1.2)
    assert here.terms_gib["reserve"] == pytest.approx(1.2)
    shift = 1.2 - base.terms_gib["reserve"]
    assert here.update_gib == pytest.approx(base.update_gib + shift)
    assert here.generation_gib == pytest.approx(base.generation_gib + shift)
    assert plan(cfg, 1, 80, cpu_reserve_gib=1.2).terms_gib["reserve"] == pytest.approx(1.0)  # GPU_RESERVE_GIB


@pytest.mark.unit
def test_fp32_gradient_sums_only_where_bf16_optimizer_runs():
    """bf16 at stage 0-1 runs BF16_Optimizer (fp32 gradient sums); with optimizer offload at stage 1 DeepSpeed takes
    its ZeRO-1 optimizer instead, which keeps none."""
    bf16 = ("model.path=Qwen/Qwen2.5-1.5B-Instruct", "model.dtype=bfloat16")
    assert "fp32 gradient accumulation" in plan(_cfg(*bf16, "deepspeed.zero_stage=1"), 1, 80).terms_gib
    off = plan(_cfg(*bf16, "deepspeed.zero_stage=1", "deepspeed.offload_optimizer=true"), 1, 80).terms_gib
    assert "fp32 gradient accumulation" not in off


@pytest.mark.unit
def test_sft_phase_by_hand():
    """`grpo plan --phase sft` on the embedded model (30 layers, H 576, I 1536, vocab 49152, 134.5M parameters):
    no generation, no reference; one micro-batch of min(8, 32 / 2 ranks) = 8 packed sequences of up to
    sft.max_length = 512 tokens; ZeRO-2 over 2 ranks shards gradients and optimizer states."""
    from grpo.commands.plan import GIB

    cfg = load_config(RECIPE, ["sft.max_length=512", "sft.batch_size=32", "optim.micro_batch_size=8",
                               "deepspeed.zero_stage=2", "algo.beta=0.04"])
    p = plan(cfg, 2, None, device="cpu", phase="sft")
    P = 49152 * 576 + 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576
    tokens = 8 * 512
    expected = {"weights": P * 4, "gradients": P * 4 / 2, "optimizer states": P * 8 / 2,
                "activations (one micro-batch)": tokens * 30 * 4 * (8 * 576 + 4 * 1536),
                "logprob chunks": 3 * 256 * 49152 * 4, "reserve": 0.45 * GIB}
    assert p.terms_gib == pytest.approx({k: v / GIB for k, v in expected.items()})  # no rollouts, no reference
    assert p.generation_gib == pytest.approx((P * (4 + 2 + 4) + 0.45 * GIB) / GIB)  # the static terms
    assert p.peak_gib == p.update_gib == pytest.approx(sum(expected.values()) / GIB)


@pytest.mark.unit
def test_does_not_fit_gives_advice_that_helps():
    cfg = _cfg("optim.micro_batch_size=16", "rollout.max_new_tokens=1024")
    small = plan(cfg, 1, 24)
    assert not small.fits and small.peak_gib > 24
    assert any("gradient_checkpointing=true" in a for a in small.advice)
    fixed = plan(_cfg("optim.micro_batch_size=4", "rollout.max_new_tokens=1024", "model.gradient_checkpointing=true"),
                 1, 80)
    assert fixed.fits


@pytest.mark.unit
def test_qlora_base_bytes_match_the_quantized_model_bitsandbytes_builds(embedded_dir):
    """The plan's 4-bit base against the bytes of the embedded model loaded in nf4 for real: every parameter's
    storage plus the quantization constants bitsandbytes keeps beside the packed weights."""
    from grpo.commands.plan import base_bytes
    from grpo.runtime.model import load_model

    model = load_model(str(embedded_dir), "float32", quantize="nf4")
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            nested = state.state2
            real += state.absmax.numel() * state.absmax.element_size() + nested.absmax.numel() * 4
    shape = model_shape("embedded:smollm2-135m")
    assert base_bytes(shape, 4, "nf4") == pytest.approx(real, rel=0.01)
    assert base_bytes(shape, 4, "none") == shape.params() * 4
    big = load_config(ROOT / "recipes" / "qwen2.5-7b-distill-r1-qlora-24gb.yaml", ["model.lora.quantize=none"])
    over = plan(big, 1, 24, phase="sft")  # the 7B student at bf16 does not fit; the advice names the 4-bit base
    assert not over.fits and any("model.lora.quantize=nf4" in a for a in over.advice)


@pytest.mark.unit
def test_bf16_at_stage_0_shards_optimizer_states_as_stage_1():
    """deepspeed_setup runs bf16 at stage 0 as stage 1 (BF16_Optimizer), which splits the fp32 master weights and Adam's
    moments over the ranks: 12 bytes per parameter / n. fp32 at stage 0 keeps whole states on every rank."""
    over = ["model.path=Qwen/Qwen2.5-1.5B-Instruct", "deepspeed.zero_stage=0"]
    bf16 = load_config(RECIPE, [*over, "model.dtype=bfloat16"])
    per_param = 1_543_714_304 * 12 / GIB
    assert plan(bf16, 1, 80).terms_gib["optimizer states"] == pytest.approx(per_param, rel=1e-3)
    two = plan(bf16, 2, 8)  # does not fit: the advice is printed
    assert two.terms_gib["optimizer states"] == pytest.approx(per_param / 2, rel=1e-3)
    assert any("deepspeed.zero_stage=2" in a for a in two.advice)  # stage 1 would change nothing
    assert not any("offload_optimizer" in a for a in two.advice)  # deepspeed_setup.ds_config offloads at stage >= 1
    fp32 = load_config(RECIPE, [*over, "model.dtype=float32"])
    assert plan(fp32, 2, 80).terms_gib["optimizer states"] == pytest.approx(1_543_714_304 * 8 / GIB, rel=1e-3)


@pytest.mark.parametrize("recipe,gpus,memory,phase", [
    ("qwen2.5-0.5b-gsm8k-24gb.yaml", 1, 24, "grpo"), ("qwen2.5-1.5b-gsm8k-80gb.yaml", 1, 80, "grpo"),
    ("qwen2.5-1.5b-math-80gb.yaml", 1, 80, "grpo"), ("qwen2.5-7b-math-multinode.yaml", 16, 80, "grpo"),
    ("qwen2.5-1.5b-gsm8k-lora-24gb.yaml", 1, 24, "grpo"), ("qwen2.5-1.5b-distill-r1.yaml", 1, 24, "sft"),
    ("qwen2.5-7b-distill-r1-qlora-24gb.yaml", 1, 24, "sft"),
])
@pytest.mark.unit
def test_shipped_gpu_recipes_load_and_fit_as_their_comments_say(recipe, gpus, memory, phase):
    path = ROOT / "recipes" / recipe
    cfg = load_config(path)
    p = plan(cfg, gpus, memory, phase=phase)
    assert p.fits
    assert f"{p.peak_gib:.1f} GiB" in path.read_text().replace("\n# ", " ")  # the figure quoted in the recipe


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
@pytest.mark.unit
def test_every_recipe_loads_with_an_installed_attention(recipe):
    """Every shipped recipe loads as it is in the environment scripts/setup.sh builds (a recipe asking for
    flash_attention_2, which nothing installs, failed only when the model loaded on the GPU node)."""
    import importlib.util

    cfg = load_config(ROOT / "recipes" / recipe)
    impl = cfg.model.attn_implementation
    assert impl in ("sdpa", "eager") or importlib.util.find_spec({"flash_attention_2": "flash_attn"}[impl])


@pytest.mark.unit
def test_flash_attention_without_the_package_is_refused_at_start_up():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs the flash-attn"):
        load_config(RECIPE, ["model.attn_implementation=flash_attention_2"])


@pytest.mark.unit
def test_recipe_comments_name_recipes_that_exist():
    import re

    for path in (ROOT / "recipes").glob("*.yaml"):
        for named in re.findall(r"recipes/[\w.-]+\.yaml", path.read_text()):
            assert (ROOT / named).is_file(), f"{path.name} names {named}, which does not exist"
