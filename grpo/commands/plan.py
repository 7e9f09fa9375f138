"""`grpo plan RECIPE --gpus N --gpu-memory GiB`: peak memory per device, predicted before a run.

The prediction is a sum of named terms, each a plain formula of the model's shape and the recipe, so a user can
see which knob moves which term:

- weights, gradients, optimizer states (AdamW: fp32 master + two moments under bf16/fp16, two moments under fp32),
  each divided over the ranks as the ZeRO stage shards it, optimizer states moved to host memory by
  `deepspeed.offload_optimizer`;
- training activations of one micro-batch (per layer per token ~ bytes*(8H + 4I) for a LLaMA/Qwen block with fused
  SDPA attention; with gradient checkpointing only each layer's input plus one layer recomputed; the prefix layout
  runs each distinct prompt of a micro-batch once and adds its attention's gathered keys/values and mask), the chunked
  vocabulary projection (`optim.logprob_chunk_size` x vocab x fp32, three live copies), and under ZeRO-3 two
  layers' gathered parameters (or the gathered head and its full gradient, when larger) and DeepSpeed's gradient
  reduce bucket (the HF engine gathers the whole model to generate);
- generation: colocated vLLM holds `rollout.vllm.gpu_memory_utilization` of the device while it samples and
  sleeps (releases it) during the update; the HF engine needs the KV cache of `rollout.generation_batch_size`
  sequences and a few fp32 [batch, vocab] score tensors;
- a fixed reserve (CUDA context and allocator slack on GPU, the interpreter and libraries on CPU).
On CPU the generation phase's memory stays counted during the update: RSS is a high-water mark and glibc keeps
freed memory.

The peak is the larger of the generation phase and the update phase. Checked against the measured peak of the
embedded model on CPU in tests/integration/test_embedded.py; the figures are in docs/memory.md (dates and commits in
docs/benchmarks.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpo.config import EMBEDDED_MODEL, Config, ConfigError

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Shapes of models the shipped recipes name by hub id (so planning needs no download); other models are read from
# their config.json (a local folder, or the HF cache).
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       tie_word_embeddings=True, attention_bias=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       tie_word_embeddings=True, attention_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     tie_word_embeddings=False, attention_bias=True),
}
CPU_RESERVE_GIB = 0.45  # RSS of python with torch, transformers, deepspeed and grpo.loop.train imported (0.44 measured)
GPU_RESERVE_GIB = 1.0  # CUDA context, NCCL buffers, allocator fragmentation
# vLLM's CPU build in the trainer process: its import and its worker's buffers beyond weights and KV cache (RSS of
# `import vllm` plus an LLM of the embedded model, less its weights, packed copy and KV cache: 0.6 GiB measured)
VLLM_CPU_RUNTIME_GIB = 0.6


@dataclass
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q = self.hidden, self.heads * self.head_dim
        attn = h * q + 2 * h * self.kv_dim + q * h + ((q + 2 * self.kv_dim) if self.qkv_bias else 0)
        return attn + 3 * h * self.inter + 2 * h

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


# bitsandbytes' 4-bit weights with nested quantization: two values a byte, one uint8 scale per block of 64, and
# one fp32 scale per 256 of those
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def _linear_dims(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven linear layers of a LLaMA/Qwen block."""
    q = s.heads * s.head_dim
    return {"q_proj": (s.hidden, q), "k_proj": (s.hidden, s.kv_dim), "v_proj": (s.hidden, s.kv_dim),
            "o_proj": (q, s.hidden), "gate_proj": (s.hidden, s.inter), "up_proj": (s.hidden, s.inter),
            "down_proj": (s.inter, s.hidden)}


def base_bytes(s: Shape, b: int, quantize: str) -> float:
    """The frozen or trained base model's bytes: every parameter in the model's dtype, or with QLoRA the blocks'
    linear weights in 4 bits (embeddings, head, norms and biases stay in the dtype: bitsandbytes leaves them)."""
    if quantize == "none":
        return s.params() * b
    linear = s.layers * sum(i * o for i, o in _linear_dims(s).values())
    return (s.params() - linear) * b + linear * NF4_BYTES


def lora_params(s: Shape, r: int, targets: str | list[str]) -> int:
    """Adapter parameters: r x (in + out) for each targeted linear layer of every block (all-linear: all seven of
    a Llama block; the head is never targeted)."""
    dims = _linear_dims(s)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    names = list(dims) if targets == "all-linear" else [t for t in targets if t in dims]
    return s.layers * sum(r * (dims[n][0] + dims[n][1]) for n in names)


def model_shape(path: str) -> Shape:
    if path in KNOWN_SHAPES:
        c = dict(KNOWN_SHAPES[path])
    else:
        from grpo.runtime.model import resolve_model_path

        local = resolve_model_path(path) if path == EMBEDDED_MODEL or Path(path).expanduser().exists() else path
        try:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(local).to_dict()
        except Exception as e:  # offline and not cached, or not a model
            raise ConfigError(f"model.path: cannot read the shape of {path} ({e}); pass a local model folder") from None
    heads = c["num_attention_heads"]
    return Shape(vocab=c["vocab_size"], hidden=c["hidden_size"], inter=c["intermediate_size"],
                 layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                 head_dim=c.get("head_dim") or c["hidden_size"] // heads, tied=bool(c.get("tie_word_embeddings")),
                 qkv_bias=bool(c.get("attention_bias", False)))


@dataclass
class Plan:
    device: str
    gpus: int
    memory_gib: float
    params: int
    terms_gib: dict[str, float]  # every term, per device
    generation_gib: float  # peak while sampling
    update_gib: float  # peak while training
    peak_gib: float
    fits: bool
    advice: list[str]

    def table(self) -> str:
        lines = [f"model: {self.params / 1e6:.1f}M parameters; {self.gpus} x {self.device}"
                 + (f" with {self.memory_gib:g} GiB" if self.memory_gib else "")]
        for k, v in self.terms_gib.items():
            lines.append(f"  {k:34s} {v:8.2f} GiB")
        lines.append(f"  {'generation phase':34s} {self.generation_gib:8.2f} GiB")
        lines.append(f"  {'update phase':34s} {self.update_gib:8.2f} GiB")
        lines.append(f"  {'predicted peak per device':34s} {self.peak_gib:8.2f} GiB")
        if self.memory_gib:
            lines.append("fits" if self.fits else "does NOT fit")
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)


def plan(cfg: Config, gpus: int, memory_gib: float | None, prompt_tokens: int | None = None,
         device: str = "cuda", phase: str = "grpo", cpu_reserve_gib: float | None = None) -> Plan:
    """`phase`: "grpo" (`grpo train`), or "sft" (`grpo sft`: no rollouts and no reference; a micro-batch is
    min(optim.micro_batch_size, sft.batch_size / gpus) sequences of up to sft.max_length tokens, packed).
    `cpu_reserve_gib`: on CPU, the RSS of the interpreter and its libraries where the run will happen (`grpo doctor`
    reads its own); None takes CPU_RESERVE_GIB, measured once, since it varies with the machine's libraries."""
    s = model_shape(cfg.model.path)
    b = BYTES[cfg.model.dtype]
    P = s.params()
    n = max(gpus, 1)
    sft = phase == "sft"
    t = _state_terms(cfg, s, b, n, device, sft)
    if sft:  # packed sequences of up to sft.max_length tokens: no padding, no prompt sharing, no generation
        m = min(cfg.optim.micro_batch_size, max(1, cfg.sft.batch_size // n))
        _update_terms(cfg, s, b, m * cfg.sft.max_length, t)
        return _finish(cfg, t, n, P, memory_gib, device, 0.0, cpu_reserve_gib)
    prompt = prompt_tokens if prompt_tokens is not None else cfg.data.max_prompt_tokens
    seq = prompt + cfg.rollout.max_new_tokens
    _rollout_update_terms(cfg, s, b, prompt, device, t)
    gen_extra = _generation_terms(cfg, s, b, seq, memory_gib, device, t)
    p = _finish(cfg, t, n, P, memory_gib, device, gen_extra, cpu_reserve_gib)
    if cfg.rollout.engine == "vllm" and device == "cuda" and memory_gib:
        p.advice += _vllm_kv_cache_advice(cfg, s, b, n, seq, t)
    return p


def _state_terms(cfg: Config, s: Shape, b: int, n: int, device: str, sft: bool) -> dict[str, float]:
    """The terms held for the whole run, per device: weights, gradients and optimizer states as the ZeRO stage
    shards them (LoRA: only the adapters train), the reference model, ZeRO-3's start-up buffers."""
    P = s.params()
    z = cfg.deepspeed.zero_stage
    mixed = cfg.model.dtype != "float32"
    t: dict[str, float] = {}
    lc = cfg.model.lora
    A = lora_params(s, lc.r, lc.target_modules) if lc.r else P  # what the optimizer trains (LoRA: the adapters)
    base = base_bytes(s, b, lc.quantize)
    t["weights"] = (base + (A * b if lc.r else 0)) / (n if z == 3 else 1)
    t["gradients"] = A * b / (n if z >= 2 else 1)
    if cfg.model.dtype == "bfloat16" and (z == 0 or (z == 1 and not cfg.deepspeed.offload_optimizer)):
        # deepspeed_setup: BF16_Optimizer sums gradients in fp32 (with offload DeepSpeed takes its ZeRO-1 optimizer)
        t["fp32 gradient accumulation"] = A * 4.0
    opt = A * (12 if mixed else 8)  # fp32 master copy + m + v, or m + v beside fp32 weights
    zs = cfg.zero_stage_run()  # bf16 at stage 0 shards master weights and optimizer states as stage 1 does
    t["optimizer states"] = 0.0 if (cfg.deepspeed.offload_optimizer and z > 0) else opt / (n if zs >= 1 else 1)
    if cfg.algo.beta > 0 and not sft:
        t["reference model"] = base / (n if z == 3 else 1)
    if z == 3:
        # DeepSpeed's stage-3 optimizer allocates its gradient reduce bucket (reduce_bucket_size = 5e8 elements, in
        # the model's dtype) at start-up; on CPU only the pages the gradients reach count
        t["zero-3 reduce bucket"] = min(5e8, P) * b
        if device == "cpu":  # the model is loaded whole, then partitioned: RSS keeps the high-water mark
            t["model load before partitioning"] = P * b
    return t


def _rollout_update_terms(cfg: Config, s: Shape, b: int, prompt: int, device: str, t: dict[str, float]) -> None:
    """What one micro-batch of rollouts adds while it trains: `_update_terms` for its tokens (the prefix layout
    runs each distinct prompt once) and, with that layout, its attention's gathered keys/values and mask."""
    new = cfg.rollout.max_new_tokens
    seq = prompt + new
    m = cfg.optim.micro_batch_size
    prefix = cfg.layout() == "prefix"
    if prefix:  # m consecutive sequences of groups of G hold at most (m - 2) // G + 2 distinct prompts, run once each
        tokens = min(m, 1 if m == 1 else (m - 2) // cfg.rollout.num_generations + 2) * prompt + m * new
    else:
        tokens = m * seq
    _update_terms(cfg, s, b, tokens, t)
    ckpt = cfg.model.gradient_checkpointing
    if prefix:  # each completion's gathered prompt+own keys and values, its queries and outputs, the mask and bias
        kv = s.kv_dim if device == "cpu" else s.hidden  # CUDA expands grouped kv heads for the masked kernel
        work = b * (2 * m * seq * kv + 2 * m * new * s.hidden) + m * new * seq * (1 + b)
        t["prefix attention"] = work * (1 if ckpt else s.layers)


def _kv_token_bytes(s: Shape, b: int) -> int:
    """The KV cache of one token: keys and values of every layer."""
    return 2 * s.layers * s.kv_dim * b


def _generation_terms(cfg: Config, s: Shape, b: int, seq: int, memory_gib: float | None, device: str,
                      t: dict[str, float]) -> float:
    """The rollout engine's terms while it samples sequences of `seq` tokens; returns their sum, what the
    generation phase adds to the terms held for the whole run."""
    P = s.params()
    if cfg.rollout.engine == "vllm" and device == "cuda":
        t["colocated vLLM (while sampling)"] = cfg.rollout.vllm.gpu_memory_utilization * (memory_gib or 0) * GIB
        gen_extra = t["colocated vLLM (while sampling)"]
    elif cfg.rollout.engine == "hf":
        batch = cfg.rollout.generation_batch_size
        t["HF generation (KV cache + scores)"] = batch * seq * _kv_token_bytes(s, b) + 4 * batch * s.vocab * 4
        gen_extra = t["HF generation (KV cache + scores)"]
        if cfg.deepspeed.zero_stage == 3:
            # grpo.rollout gathers the whole model once per generate call, into new full-size tensors
            t["gathered weights to generate"] = P * b
            gen_extra += t["gathered weights to generate"]
    else:  # server mode, or vLLM on CPU (its own KV cache size)
        # on CPU the engine keeps plain weights beside the oneDNN-packed copies (rollout/vllm_engine.py repacks them)
        gen_extra = ((cfg.rollout.vllm.kv_cache_gib + VLLM_CPU_RUNTIME_GIB) * GIB + 2 * P * b
                     if cfg.rollout.engine == "vllm" else 0.0)
        if gen_extra:
            t["colocated vLLM (weights x2 + KV cache + runtime)"] = gen_extra
    return gen_extra


def _vllm_kv_cache_advice(cfg: Config, s: Shape, b: int, n: int, seq: int, t: dict[str, float]) -> list[str]:
    """Colocated vLLM on GPU: a note when the KV cache left beside its weights holds less than a step's sequences
    (it then generates in several waves)."""
    kv_room = t["colocated vLLM (while sampling)"] - s.params() * b
    want = cfg.rollout.prompts_per_step * cfg.rollout.num_generations / n * seq * _kv_token_bytes(s, b)
    if kv_room < want:
        return [f"vLLM's KV cache ({max(kv_room, 0) / GIB:.1f} GiB) holds less than a step's "
                f"sequences ({want / GIB:.1f} GiB): it will generate in several waves (slower, not an "
                "error)"]
    return []


def _update_terms(cfg: Config, s: Shape, b: int, tokens: int, t: dict[str, float]) -> None:
    """What one micro-batch of `tokens` tokens adds while it trains: activations, the chunked head, ZeRO-3's
    gathered layers."""
    per_layer_token = b * (8 * s.hidden + 4 * s.inter)
    act = (tokens * (s.layers * s.hidden * b + per_layer_token) if cfg.model.gradient_checkpointing
           else tokens * s.layers * per_layer_token)
    t["activations (one micro-batch)"] = act
    t["logprob chunks"] = 3 * min(cfg.optim.logprob_chunk_size, tokens) * s.vocab * 4
    if cfg.deepspeed.zero_stage == 3:  # two layers in flight, or, in the vocabulary projection, the head and its
        # unreduced gradient
        t["zero-3 gathered layers"] = max(2 * s.layer_params(), 2 * s.vocab * s.hidden) * b


def _finish(cfg: Config, t: dict[str, float], n: int, P: int, memory_gib: float | None, device: str,
            gen_extra: float, cpu_reserve_gib: float | None = None) -> Plan:
    """The phases' peaks from the terms, the verdict, and advice when it does not fit."""
    cpu_reserve = CPU_RESERVE_GIB if cpu_reserve_gib is None else cpu_reserve_gib
    reserve = (GPU_RESERVE_GIB if device == "cuda" else cpu_reserve) * GIB
    t["reserve"] = reserve
    static = (t["weights"] + t["gradients"] + t.get("fp32 gradient accumulation", 0.0) + t["optimizer states"]
              + t.get("reference model", 0.0) + reserve + t.get("zero-3 reduce bucket", 0.0)
              + t.get("model load before partitioning", 0.0))
    # CPU: colocated vLLM never sleeps, and glibc keeps the HF engine's freed KV cache in the process (RSS is a
    # high-water mark), so the generation phase's memory is still counted during the update
    held_in_update = gen_extra if device == "cpu" else 0.0
    update = (static + t["activations (one micro-batch)"] + t.get("prefix attention", 0.0) + t["logprob chunks"]
              + t.get("zero-3 gathered layers", 0.0) + held_in_update)
    generation = static + gen_extra
    peak = max(update, generation)
    fits = memory_gib is None or peak <= memory_gib * GIB
    advice = [] if fits else _advice(cfg, t, memory_gib * GIB, n, device)
    return Plan(device, n, memory_gib or 0.0, P, {k: v / GIB for k, v in t.items()}, generation / GIB,
                update / GIB, peak / GIB, fits, advice)


def _advice(cfg: Config, t: dict[str, float], budget: float, n: int, device: str) -> list[str]:
    out = []
    act = t["activations (one micro-batch)"]
    if not cfg.model.gradient_checkpointing and act > 0.1 * budget:
        out.append("model.gradient_checkpointing=true (activations shrink to each layer's input)")
    if cfg.optim.micro_batch_size > 1 and act > 0.1 * budget:
        out.append(f"optim.micro_batch_size={max(cfg.optim.micro_batch_size // 2, 1)} (activations scale with it)")
    z = cfg.deepspeed.zero_stage
    zs = cfg.zero_stage_run()
    if n > 1 and zs < 3:
        out.append(f"deepspeed.zero_stage={zs + 1 if zs < 2 else 3} (shards "
                   + ("optimizer states" if zs == 0 else "gradients" if zs == 1 else "weights") + f" over {n} GPUs)")
    if z > 0 and not cfg.deepspeed.offload_optimizer and device == "cuda":
        out.append("deepspeed.offload_optimizer=true (optimizer states to host memory; slower steps)")
    if cfg.model.dtype == "float32" and device == "cuda":
        out.append("model.dtype=bfloat16 (halves weights, gradients and activations)")
    if cfg.model.lora.r and cfg.model.lora.quantize == "none":
        out.append("model.lora.quantize=nf4 (QLoRA: the frozen base's linear layers in 4 bits)")
    if cfg.rollout.engine == "vllm" and device == "cuda":
        out.append("a lower rollout.vllm.gpu_memory_utilization, or rollout.engine=vllm_server on other GPUs")
    if n == 1 or z == 3:
        out.append("more GPUs (ZeRO-3 divides weights, gradients and optimizer states by their number)")
    return out


def longest_prompt(cfg: Config) -> int | None:
    """The longest training prompt in tokens, when the model's tokenizer and the data are on this machine (None
    otherwise: planning never downloads)."""
    local_model = cfg.model.path == EMBEDDED_MODEL or Path(cfg.model.path).expanduser().exists()
    local_data = cfg.data.source == "reasoning_gym" or Path(cfg.data.path or "").expanduser().is_file()
    if not (local_model and local_data):
        return None
    try:
        from grpo.data import load_rows, render
        from grpo.runtime.model import load_tokenizer, resolve_model_path

        tok = load_tokenizer(resolve_model_path(cfg.model.path))
        rows, _ = load_rows(cfg.data)
        return max(len(r["prompt_ids"]) for r in render(rows, cfg.data, tok).rows)
    except Exception:
        return None


def main(recipe: str, overrides: list[str], gpus: int, memory_gib: float | None, device: str,
         as_json: bool, phase: str = "grpo") -> int:
    from grpo.config import load_config

    cfg = load_config(recipe, overrides)
    prompt = longest_prompt(cfg) if phase == "grpo" else None
    p = plan(cfg, gpus, memory_gib, prompt, device, phase)
    if as_json:
        print(json.dumps(asdict(p), indent=1))
    else:
        src = f"longest prompt {prompt} tokens" if prompt is not None else (
            f"model or data not on this machine: prompts assumed data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
        if phase == "sft":
            src = f"grpo sft: micro-batches of sequences of sft.max_length={cfg.sft.max_length} tokens"
        print(f"{recipe} ({src})")
        print(p.table())
    return 0 if p.fits else 1
