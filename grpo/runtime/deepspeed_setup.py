"""DeepSpeed: distributed set-up, the ZeRO engine for the policy, and a frozen reference when beta > 0.

On CPU (`DS_ACCELERATOR=cpu`) the gloo backend runs several processes on one machine, so multi-process ZeRO runs
for real in CI; on GPUs NCCL. A single process with no launcher gets a one-rank process group of its own.
The optimizer steps once per rollout batch (per pass): micro-batches accumulate gradients, and the loss of each
micro-batch is already normalised for the whole step, so DeepSpeed's own division by the accumulation count is
switched off (`scale_wrt_gas=False`) and its averaging over ranks is undone by the caller's scale.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from grpo.config import Config, ConfigError


def pick_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no GPU is visible (use device=cpu or auto)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def check_device_options(cfg: Config, device: str) -> None:
    """GPU-only options fail at start-up on CPU, naming the key."""
    if device == "cpu":
        if cfg.deepspeed.offload_optimizer:
            raise ConfigError("deepspeed.offload_optimizer: needs a GPU (on CPU the optimizer is already there)")
        if cfg.model.attn_implementation == "flash_attention_2":
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a GPU")
        if cfg.model.dtype == "float16":
            raise ConfigError("model.dtype: float16 training needs a GPU (use float32 or bfloat16)")


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world_size). Fills in a one-process rendezvous when started without a launcher."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier on the base LR at optimizer step s: linear warm-up, then constant / cosine / linear decay."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        frac = min(1.0, (s - warmup) / span)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0 - frac

    return f


def ds_config(cfg: Config, micro_batch: int, grad_accum: int, train: bool = True) -> dict[str, Any]:
    z: dict[str, Any] = {"stage": cfg.zero_stage_run()}
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.zero_stage == 3:
        z.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": z,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.model.dtype == "bfloat16" and cfg.deepspeed.zero_stage <= 1:
        # At stage 0 DeepSpeed runs bf16 through its FP16 unfused optimizer, which sums the micro-batches'
        # gradients in bf16 (8 mantissa bits: small contributions round away over many accumulation steps).
        # Stage 1 with fp32 gradient accumulation is its BF16_Optimizer: fp32 master weights and fp32 gradient
        # sums (grpo plan counts both; the stage is Config.zero_stage_run's). Its ranks average those sums with
        # the engine's fallback all-reduce, which casts them to communication_data_type first, bf16 by default with
        # bf16 on: fp32 keeps one rank's step and several ranks' steps on the same precision (and averages the flat
        # fp32 buffer in place, no copy).
        # With optimizer offload DeepSpeed takes its ZeRO-1 optimizer instead, whose bf16 gradient buckets fp32
        # communication would copy at twice their size: left at its default there.
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        if "offload_optimizer" not in z:
            out["communication_data_type"] = "fp32"
    if train:
        out["gradient_clipping"] = cfg.optim.max_grad_norm
        out["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
            "eps": 1e-8, "torch_adam": True}}
    return out


def forward_in_engine(engine, fn: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
    """`fn(engine.module)` run as the module's forward, through `DeepSpeedEngine.forward`.

    Why: the trainer computes logprobs with the model's body and head itself (no full-vocabulary logits), but the
    engine's forward is where DeepSpeed opens a micro-step, and skipping it broke ZeRO-3 silently: its
    gradient-accumulation counter only advances there, so every micro-batch's gradient overwrote the previous one's and
    only the last micro-batch of a step trained (tests/integration/test_update_reference.py). The engine's forward also
    resets ZeRO-3's parameter-fetch trace and hooks the output for the backward's prologue. The module's forward is
    swapped for the call only, so all of the engine's and the module's hooks run as DeepSpeed expects. `fn` returns one
    tensor: every output DeepSpeed wraps should take part in the backward."""
    module = engine.module
    own = module.__dict__.get("forward")
    module.forward = lambda: fn(module)
    try:
        return engine()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def build_policy_engine(model: torch.nn.Module, cfg: Config, micro_batch: int, grad_accum: int):
    import deepspeed

    total_updates = cfg.steps * cfg.algo.num_iterations

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, total_updates,
                                                                cfg.optim.schedule))

    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=ds_config(cfg, micro_batch, grad_accum), lr_scheduler=scheduler)
    lean_stage0_allreduce(engine)
    return engine


# Elements per flattened bucket of DeepSpeed's fallback gradient all-reduce (its default is 5e8: the whole gradient
# of any model under 500M parameters copied at once).
ALLREDUCE_BUCKET = 2**25


def lean_stage0_allreduce(engine) -> None:
    """Where DeepSpeed averages gradients over the ranks with its fallback all-reduce (stage 0, and stage 1 under
    BF16_Optimizer, which has no reduce of its own: every bf16 recipe), it flattens them into buckets of a fixed 5e8
    elements: one extra full copy of the gradients (of the fp32 sums, under BF16_Optimizer) at every step's peak,
    even with one rank (measured: +0.2 GiB of peak RSS for the 135M model's fp32 `grpo sft`). With one rank there is
    nothing to average: the all-reduce is off (BF16_Optimizer folds the micro-batch into its fp32 sums before it, in
    backward_epilogue). With several, buckets of about ALLREDUCE_BUCKET elements (a bucket is sent once it passes
    that) bound the copy at stage 0; BF16_Optimizer hands over one flat fp32 buffer, which DeepSpeed flattens as a
    view and, in fp32 (ds_config's communication_data_type), averages in place. Stages 2-3 and ZeRO-1's own
    optimizer reduce through their buckets, left as they are.
    One difference with one rank: a trainable parameter that got no gradient keeps None where the fallback would
    give it zeros (torch's AdamW then skips it for the step; with LoRA and full fine-tuning every one gets one)."""
    import functools

    import torch.distributed as dist

    if engine.zero_optimization_partition_gradients() or (
            engine.zero_optimization_stage() == 1 and hasattr(engine.optimizer, "reduce_gradients")):
        return
    if dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    else:  # the engine calls self.allreduce_gradients() with its default bucket size
        engine.allreduce_gradients = functools.partial(type(engine).allreduce_gradients, engine,
                                                       bucket_size=ALLREDUCE_BUCKET)


def build_reference(model: torch.nn.Module, cfg: Config, micro_batch: int, grad_accum: int):
    """A frozen copy for the KL term; sharded like the policy under ZeRO-3, plain otherwise."""
    model.requires_grad_(False)
    model.eval()
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=ds_config(cfg, micro_batch, grad_accum, train=False))
        engine.eval()
        return engine.module
    return model


def stage0_grad_norm(engine) -> float:
    """The pre-clip gradient norm at ZeRO stage 0, read before `engine.step()` clears the gradients. DeepSpeed does
    not record it for fp32 there, and for fp16 its optimizer (FP16_UnfusedOptimizer with torch's AdamW) records
    the norm of the loss-scaled gradients: a logged norm 65536 times too large. Here the scale in force for this
    backward is divided out (the step may change it)."""
    sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)
    scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
    return math.sqrt(sq) / scale


def recorded_grad_norm(engine) -> float:
    """The gradient norm DeepSpeed recorded at its last step (ZeRO stages 1-3, bf16); NaN when it has none."""
    gn = engine.get_global_grad_norm()
    return float(gn) if gn is not None else math.nan
