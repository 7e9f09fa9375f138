"""LoRA adapters on the policy (`model.lora.r > 0`), through peft, for `grpo train` and `grpo sft`.

The adapters are injected into the transformers model in place (`peft.inject_adapter_in_model`), so the model
keeps its class and its body/head, which the chunked logprobs and the prefix attention rely on; every other
parameter is frozen, and DeepSpeed gets only the adapters (their gradients and optimizer states are all the
optimizer holds). What leaves the trainer is always plain HF weights: the rollout engines are sent the merged
weights (W + scale * B @ A, under the HF names: `q_proj.base_layer.weight` goes out as `q_proj.weight`), so the
sync's checksum and canary check them as they check a full fine-tune; `final/` is the merged model, with the
adapter beside it in peft's format (`final/adapter/`, loadable by `PeftModel.from_pretrained`); checkpoints hold
the adapters and their optimizer state only (the frozen base is `model.path`).

QLoRA (`model.lora.quantize: nf4`): the frozen base's linear layers are bitsandbytes 4-bit parameters (packed
uint8 plus a quantization state). What leaves the trainer is still plain weights in `model.dtype`: the base is
dequantized layer by layer and the adapters merged into it, so the engines (which load `model.path` at full
precision) run exactly the weights the trainer computes with, from the first sync on, and the canary holds them
to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ADAPTER = "default"


def apply(model: torch.nn.Module, lc: Any) -> torch.nn.Module:
    """Inject LoRA layers (`lc`: the recipe's model.lora) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model._grpo_lora_config = config  # for the adapter export
    return model


def active(model: torch.nn.Module) -> bool:
    return getattr(model, "_grpo_lora_config", None) is not None


def hf_name(name: str) -> str | None:
    """The HF name a parameter goes out under: adapters none (they are merged), wrapped layers without
    `.base_layer`."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def base_weight(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base weight as the layer computes with it: a 4-bit parameter dequantized to `dtype` (the model's: the
    layer computes in it), any other as it is."""
    state = getattr(p, "quant_state", None)
    if state is None:
        return p.detach()
    import bitsandbytes.functional as bnbf

    if getattr(state, "packing_format_for_cpu", False):  # grpo.runtime.model.keep_one_layout prevents it
        raise RuntimeError("a 4-bit weight was repacked for bitsandbytes' CPU kernel and cannot be dequantized")
    return bnbf.dequantize_4bit(p.detach(), state).to(dtype)


def logical_shape(p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of the weight a parameter stands for: a 4-bit parameter's packed storage is uint8 of
    another shape, and it goes out in `dtype` (the model's)."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return dtype, tuple(state.shape)
    return p.dtype, tuple(getattr(p, "ds_shape", p.shape))


def weight_count(model: torch.nn.Module, adapters: bool = True) -> int:
    """Values of the weights the parameters stand for (a 4-bit parameter's packed storage holds two a byte;
    ZeRO-3's partitioned ones count whole)."""
    dtype = compute_dtype(model)
    return sum(math.prod(logical_shape(p, dtype)[1]) for n, p in model.named_parameters()
               if adapters or ".lora_" not in n)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its config's; a 4-bit model's parameters are partly uint8)."""
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else next(p.dtype for p in model.parameters()
                                                             if p.is_floating_point())


@contextmanager
def plain(model: torch.nn.Module) -> Iterator[None]:
    """The model as transformers should save it with a merged state dict: without its 4-bit quantizer, which
    would otherwise replace the given state dict by its own packed one and mark the config as quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    if quantizer is None and qconfig is None:
        yield
        return
    model.hf_quantizer = None
    if qconfig is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every parameter with the adapters merged into their base weights, one at a time (a
    merged copy only exists for the layer being yielded)."""
    layers = _lora_layers(model)
    dtype = compute_dtype(model)
    for name, p in model.named_parameters():
        out = hf_name(name)
        if out is None:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        w = base_weight(p, dtype)
        if owner and leaf == "weight":
            with torch.no_grad():
                yield out, w + layers[owner].get_delta_weight(ADAPTER).to(w.dtype)
        else:
            yield out, w


def save_adapter(model: torch.nn.Module, out: Path, base: str) -> None:
    """The adapters in peft's own format (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = model._grpo_lora_config
    config.base_model_name_or_path = base
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(str(out))
    tensors = {"base_model.model." + n.replace(f".{ADAPTER}.", "."): p.detach().cpu().contiguous()
               for n, p in model.named_parameters() if ".lora_" in n}
    save_file(tensors, str(out / "adapter_model.safetensors"))
