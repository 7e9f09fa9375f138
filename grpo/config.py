"""Typed configuration: the only place defaults live.

A recipe is a YAML file whose nested mappings mirror these pydantic models; command-line overrides are dotted
`key=value` strings parsed as YAML scalars (`rollout.num_generations=16`). Constraints sit in the types and are
checked at start-up: an unknown key, a wrong type or a bad value raises `ConfigError` naming the file and the dotted
key. Types are strict (a bool is a YAML bool, an int is no float), but a float takes an int or a string such as
"3e-6" (YAML 1.1 reads it as one) and a string takes a number. Assigning an attribute later is not re-validated.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key (and the file where known)."""


EMBEDDED_MODEL = "embedded:smollm2-135m"


def _float(v: Any) -> Any:
    try:
        return float(v) if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) else v
    except ValueError:
        return v  # the float validator names it


Num = Annotated[float, BeforeValidator(_float)]
Str = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) in (int, float) else v)]


class _Bad(ValueError):
    """A cross-field check failed; `key`, relative to the model checked, names the field."""

    def __init__(self, key: str, msg: str):
        super().__init__(msg)
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    at: ClassVar[str] = ""  # the section's dotted key in Config (set below), for errors of direct construction

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_message(e, type(self), self.at)) from None

    __init__.__pydantic_base_init__ = True  # as RootModel does: nested sections are validated without this __init__

    def validate(self) -> None:
        """Check again, e.g. after attributes were assigned (construction validates, assignment does not)."""
        type(self)(**self.model_dump(by_alias=True))


class LoraSettings(_Section):
    """LoRA adapters (peft) trained in place of the full model; r = 0 trains the full model."""

    r: int = Field(0, ge=0, description="adapter rank; 0: full fine-tuning")
    alpha: Num = Field(32.0, gt=0, description="scale numerator (the update is alpha / r x B A)")
    dropout: Num = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: Str | list[Str] = Field("all-linear", description="peft's target_modules: all-linear (every "
                                            "linear layer but the head), or names such as [q_proj, v_proj]")
    quantize: Literal["none", "nf4", "fp4"] = Field(
        "none", description="QLoRA: hold the frozen base in 4 bits (bitsandbytes; nf4 as in the QLoRA paper)")

    @model_validator(mode="after")
    def _check(self) -> LoraSettings:
        if self.quantize != "none" and not self.r:
            raise _Bad("model.lora.quantize", "a 4-bit base is frozen: it needs LoRA adapters (model.lora.r > 0)")
        return self


class ModelConfig(_Section):
    """The policy. `path` is a local HF folder, a hub name, or `embedded:smollm2-135m` (shipped on PyPI)."""

    path: Str = Field(EMBEDDED_MODEL, description="a local HF folder, a hub name, or embedded:smollm2-135m")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of training and generation")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers' attention; flash_attention_2 needs the flash-attn package")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    revision: Str | None = Field(None, description="a hub model's branch, tag or commit (not for local folders)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code (only repos you trust)")
    lora: LoraSettings = Field(LoraSettings(), description=LoraSettings.__doc__)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise _Bad("attn_implementation", "flash_attention_2 needs the flash-attn package, which scripts/setup.sh"
                       " does not install (pip install flash-attn on a CUDA machine), or use sdpa")
        return self


class DataConfig(_Section):
    """Where prompts come from. `source: reasoning_gym` generates a task offline; `source: hf` reads a data set
    (a hub name, or a local .jsonl/.json/.parquet/.csv file) with a prompt column and an answer column."""

    source: Literal["reasoning_gym", "hf"] = Field("reasoning_gym", description="a generated task, or a data set")
    task: Str = Field("basic_arithmetic", description="reasoning-gym task name")
    task_args: dict[str, Any] = Field({}, description="passed to reasoning_gym.create_dataset")
    path: Str | None = Field(None, description="hf: hub name or local file (required)")
    subset: Str | None = Field(None, description="hf: the data set's configuration (\"main\" for openai/gsm8k)")
    split: Str = Field("train", description="hf and local folders: which split")
    revision: Str | None = Field(None, description="hf: a hub data set's branch, tag or commit")
    prompt_column: Str = Field("question", description="text, or TRL's conversational format ({role, content} list)")
    answer_column: Str = Field("answer", description="the gold answer, which `accuracy` compares against")
    answer_pattern: Str | None = Field(None, description="hf: regex whose group 1 is the gold answer (GSM8K: "
                                                         "`####\\s*(.+)$`)")
    system_prompt: Str | None = Field(None, description="a system message before every prompt")
    few_shot: list[dict[str, Str]] = Field([], description="example exchanges, each {user, assistant}, shown before "
                                           "every prompt (after the system message)")
    prompt_template: Str = Field("{question}", description="formatted with the row's columns")
    num_train: int = Field(2000, gt=0, description="prompts in the training split (reasoning_gym; hf: at most)")
    num_eval: int = Field(200, ge=0, description="held-out prompts, never trained on")
    seed: int = Field(0, description="seed of the generated task and of the held-out split")
    max_prompt_tokens: int = Field(512, gt=0, description="longer prompts are reported and dropped, never cut")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for n, ex in enumerate(self.few_shot):
            if set(ex) != {"user", "assistant"}:
                raise _Bad(f"few_shot[{n}]", f"needs exactly the keys user and assistant, got {sorted(ex)}")
        if self.source == "hf" and not self.path:
            raise _Bad("path", "required when data.source is 'hf' (a hub name or a local file)")
        try:
            if self.answer_pattern is not None and re.compile(self.answer_pattern).groups < 1:
                raise _Bad("answer_pattern", f"{self.answer_pattern!r} needs a capture group, e.g. '####\\s*(.+)$'")
        except re.error as e:
            raise _Bad("answer_pattern", f"not a valid regex: {e}") from None
        if "{" not in self.prompt_template:
            raise _Bad("prompt_template", "must reference a column, e.g. '{question}'")
        return self


class VLLMConfig(_Section):
    """vLLM engines. `vllm`: colocated, in the trainer process (sleeps during the update on CUDA).
    `vllm_server`: `vllm serve` processes started with `grpo serve` (other GPUs or nodes); weights go to them through
    vLLM's weight-transfer API over a process group (NCCL on GPUs, gloo on CPU). After every sync the engine's
    weights are checksummed against the trainer's and a canary compares the engine's logprobs on a fixed probe
    sequence with the trainer's."""

    gpu_memory_utilization: Num = Field(0.3, gt=0, le=1, description="colocated share of each GPU; servers: 0.9")
    kv_cache_gib: Num = Field(1.0, gt=0, description="CPU: KV cache size")
    max_model_len: int | None = Field(None, gt=0, description="default: data.max_prompt_tokens + max_new_tokens")
    enforce_eager: bool | None = Field(None, description="null: eager on CPU (compiling takes minutes), CUDA graphs "
                                                         "on GPU")
    sleep: bool = Field(True, description="colocated on CUDA: free the KV cache, offload weights during updates")
    servers: list[Str] = Field([], description="vllm_server: base URLs, e.g. http://node7:8000")
    sync_host: Str | None = Field(None, description="address the servers reach the trainer at (default: hostname)")
    sync_port: int = Field(51216, description="TCP port of the weight-sync rendezvous on the trainer's rank 0")
    sync_bucket_mb: int = Field(256, gt=0, description="weights are gathered and sent in buckets of this size")
    weight_transfer: Literal["auto", "nccl", "grpo_broadcast"] = Field(
        "auto", description="vllm_server: vLLM's weight-transfer backend; auto: nccl on GPUs, grpo_broadcast (gloo, "
        "ours) on CPU. The trainer and `grpo serve` must agree")
    timeout: Num = Field(600.0, gt=0, description="seconds for a request to a server or a collective with it")
    canary: Literal["error", "warn", "off"] = Field("error", description="what a failed sync check does")
    canary_tolerance: Num | None = Field(None, gt=0, description="max mean |engine - trainer| probe logprob; null: "
                                                                 "per model.dtype")

    @model_validator(mode="after")
    def _check(self) -> VLLMConfig:
        for i, url in enumerate(self.servers):
            if not url.startswith(("http://", "https://")):
                raise _Bad(f"servers[{i}]", f"{url!r} is not an http:// URL")
        return self


class RolloutConfig(_Section):
    """Sampling. Each step draws `prompts_per_step` prompts and samples `num_generations` completions for each."""

    engine: Literal["hf", "vllm", "vllm_server"] = Field("hf", description="hf (transformers generate) | vllm "
                                                                           "(colocated) | vllm_server (grpo serve)")
    prompts_per_step: int = Field(8, gt=0, description="prompts per step, across all ranks")
    num_generations: int = Field(8, ge=2, description="G, completions per prompt (a group needs two to compare)")
    max_new_tokens: int = Field(64, gt=0, description="completion length limit in tokens")
    temperature: Num = Field(1.0, gt=0, description="sampling temperature")
    top_p: Num = Field(1.0, gt=0, le=1, description="nucleus sampling probability mass")
    generation_batch_size: int = Field(64, gt=0, description="sequences per generate call")
    dynamic_sampling: bool = Field(False, description="DAPO: drop zero-variance groups, sample more prompts to refill")
    max_sampling_rounds: int = Field(4, gt=0, description="bound on refills per step when dynamic_sampling is on")
    async_: bool = Field(False, alias="async", description="vllm_server: the servers generate the next step's groups "
                         "while the trainer updates on this step's (one step of staleness)")
    max_staleness: int = Field(1, ge=1, description="async: groups sampled more than this many weight versions "
                               "behind the trainer are dropped (and counted)")
    async_pause: Literal["keep", "abort"] = Field("keep", description="async: requests in flight during a weight "
                                                  "update are kept (finish on the new weights) or aborted and resent")
    vllm: VLLMConfig = Field(VLLMConfig(), description="the vLLM engines")
    tools: list[Str] = Field([], description="tools the model may call while it writes: calculator, python, or "
                             "module:function (a typed function with a docstring, as TRL takes them); []: one turn")
    tool_format: Literal["inline"] = Field("inline", description="inline: `<name>arguments</name>`, answered by "
                                           "`<result>output</result>` in the same turn (templates without tool "
                                           "support)")
    max_turns: int = Field(4, ge=1, validation_alias=AliasChoices("max_turns", "max_tool_calling_iterations"),
                           description="tool calls answered per completion (TRL: max_tool_calling_iterations)")
    tool_timeout: Num = Field(5.0, gt=0, description="seconds per tool call, in a killable worker; past it the model "
                              "reads an error")
    max_tool_output_tokens: int = Field(64, gt=0, description="a tool's output is cut to this many tokens, its head "
                                        "and tail kept; max_new_tokens bounds the whole completion, tools included")
    tool_workers: int = Field(2, gt=0, description="tool worker processes")

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.tools and self.async_:
            raise _Bad("tools", "does not run with rollout.async yet (tool calls in the background generation are "
                       "untested); set rollout.async=false")
        if self.async_ and self.engine != "vllm_server":
            raise _Bad("async", "needs rollout.engine=vllm_server (servers generate while the trainer updates)")
        if self.async_ and self.dynamic_sampling:
            raise _Bad("async", "does not combine with rollout.dynamic_sampling (its refill rounds are collective "
                       "decisions of the ranks, which a background rollout cannot take part in)")
        return self


class RewardConfig(_Section):
    """One reward function, chosen by name, with its weight and its own parameters next to it."""

    name: Str = Field("", description="a built-in name, or module:function (required)")
    weight: Num = Field(1.0, description="its weight in the total reward")
    args: dict[str, Any] = Field({}, description="passed on every call")
    init: dict[str, Any] = Field({}, description="a factory's arguments (TRL / open-r1 `get_*_reward(...)`)")
    timeout: Num = Field(10.0, gt=0, description="seconds per completion (in workers); past it: a timeout, not a 0")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if not self.name:
            raise _Bad("name", "required")
        return self


class ScoringConfig(_Section):
    """Where rewards run. workers > 0: killable worker processes (per-sample deadlines, memory cap);
    0: in the trainer process (fast for cheap rewards; a hang there is a hang of the run)."""

    workers: int = Field(2, ge=0, description="reward worker processes; 0: in the trainer process")
    memory_mb: int = Field(2048, gt=0, description="address-space limit of each worker")
    max_error_frac: Num = Field(0.1, description="warn loudly when more of a step's samples fail to score")


class AlgoConfig(_Section):
    """The GRPO objective. `tis*`: engine/trainer mismatch correction (vLLM samples, the trainer scores): weight
    each token (or sequence) by pi_trainer / pi_engine, truncated at tis_cap (or masked above it)."""

    advantage: Literal["grpo", "drgrpo", "rloo"] = Field("grpo", description="grpo (mean/std) | drgrpo (mean only) "
                                                                             "| rloo (leave-one-out)")
    clip_low: Num = Field(0.2, ge=0, lt=1, description="lower clip range of the ratio")
    clip_high: Num = Field(0.28, ge=0, description="upper clip range of the ratio (clip-higher, DAPO)")
    loss_agg: Literal["token", "sequence", "constant"] = Field("token", description="how token losses are averaged")
    beta: Num = Field(0.0, ge=0, description="KL weight (k3 against a frozen reference); 0 loads no reference")
    num_iterations: int = Field(1, gt=0, description="gradient passes per rollout batch; old logprobs computed once")
    ratio: Literal["token", "sequence"] = Field("token", description="token (PPO/GRPO) | sequence (GSPO; small clips)")
    tis: bool | None = Field(None, description="importance weights; null: on with vLLM engines, off with hf")
    tis_cap: Num = Field(2.0, gt=0, description="importance weights are truncated (or masked) above this")
    tis_level: Literal["token", "sequence"] = Field("token", description="sequence: the product of its token ratios")
    tis_mode: Literal["truncate", "mask"] = Field("truncate", description="truncate (min(w, cap)) | mask (w, or 0 "
                                                                          "where w > cap)")


class OptimConfig(_Section):
    """AdamW with warm-up and a schedule, gradient clipping, micro-batching."""

    lr: Num = Field(1e-6, gt=0, description="peak learning rate")
    weight_decay: Num = Field(0.0, ge=0, description="AdamW weight decay")
    betas: list[Annotated[Num, Field(ge=0, lt=1)]] = Field([0.9, 0.99], min_length=2, max_length=2,
                                                           description="AdamW betas, two numbers in [0, 1)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the learning rate, in steps")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="after warm-up")
    max_grad_norm: Num = Field(1.0, ge=0, description="gradient clipping norm")
    micro_batch_size: int = Field(16, gt=0, description="sequences per forward/backward on each rank (packed)")
    logprob_chunk_size: int = Field(256, gt=0, description="tokens per chunk of the vocabulary projection")
    layout: Literal["auto", "prefix", "padded", "packed"] = Field("auto", description="auto: prefix (padded for "
                                                                                      "eager attention)")


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO. On CPU the gloo backend is used; `offload_optimizer` needs a GPU to be worthwhile."""

    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 | 1 | 2 | 3")
    offload_optimizer: bool = Field(False, description="optimizer state in CPU memory")


class EvalConfig(_Section):
    """Greedy evaluation on the held-out split."""

    every: int = Field(10, ge=0, description="steps; 0 disables in-loop eval")
    at_start: bool = Field(True, description="evaluate before the first step")
    at_end: bool = Field(True, description="evaluate after the last step")
    max_new_tokens: int | None = Field(None, description="defaults to rollout.max_new_tokens")
    batch_size: int = Field(100, gt=0, description="prompts per eval generate call")
    num_samples: int = Field(1, gt=0, description="1: greedy; k > 1: k samples per problem at `temperature` (pass@k)")
    temperature: Num = Field(1.0, gt=0, description="sampling temperature when num_samples > 1")


class LogConfig(_Section):
    """Metrics, rollout records and the final upload."""

    wandb: bool = Field(False, description="log to wandb (offline mode when WANDB_API_KEY is not set)")
    wandb_project: Str = Field("grpo", description="wandb project name")
    rollouts: bool = Field(True, description="write rollout records (parquet) every step")
    push_to_hub: Str | None = Field(None, description="hub id (user/model) the final folder is uploaded to")


class CheckpointConfig(_Section):
    """Periodic checkpoints, resumption and the final model folder."""

    every: int = Field(50, ge=0, description="steps; 0 disables periodic checkpoints")
    keep: int = Field(2, ge=1, description="complete checkpoints kept (never fewer than one)")
    resume: Str = Field("auto", description="auto (latest valid one of output_dir) | never | a checkpoint path")
    save_final_model: bool = Field(True, description="plain HF folder at output_dir/final")


class SFTConfig(_Section):
    """`grpo sft`: supervised fine-tuning (a cold start before GRPO, or a student on distilled traces)."""

    data: Str | None = Field(None, description="a save_to_disk folder or a .parquet/.jsonl/.json file (TRL's formats: "
                             "prompt + completion, text or messages; or messages); required by grpo sft")
    epochs: Num = Field(1.0, gt=0, description="passes over the data (steps = epochs x rows / batch_size, rounded up)")
    batch_size: int = Field(32, gt=0, description="sequences per optimizer step, across all ranks")
    max_length: int = Field(1024, gt=0, description="prompt + completion tokens; longer rows fail at start-up (named)")
    completion_only_loss: bool = Field(True, description="loss on the completion tokens only (false: the prompt's too)")


class TeacherConfig(_Section):
    """`grpo distill`'s teacher: a local model (sampled in-process by rollout.engine hf or vllm) or an
    OpenAI-compatible endpoint (`vllm serve`, a hosted model)."""

    model: Str | None = Field(None, description="in-process: a local HF folder (e.g. a run's final/); or, with url, "
                              "the model name the endpoint serves")
    url: Str | None = Field(None, description="an OpenAI-compatible base URL, e.g. http://node7:8000/v1")
    api_key_env: Str = Field("OPENAI_API_KEY", description="url: the environment variable holding the API key")
    concurrency: int = Field(8, gt=0, description="url: requests in flight at once")
    retries: int = Field(5, ge=0, description="url: retries per request (errors, timeouts, 429/5xx, garbage)")
    backoff: Num = Field(1.0, gt=0, description="url: seconds before the first retry, doubled each time")
    timeout: Num = Field(300.0, gt=0, description="url: seconds per request")


class DistillConfig(_Section):
    """`grpo distill`: a teacher samples each training prompt, the recipe's rewards keep the verified samples, the
    result is a data set `grpo sft` reads."""

    teacher: TeacherConfig = Field(TeacherConfig(), description=TeacherConfig.__doc__)
    num_samples: int = Field(4, gt=0, description="N, samples per prompt")
    num_prompts: int | None = Field(None, gt=0, description="the first prompts of the training split (null: all)")
    verify: Str | None = Field(None, description="the reward a sample must pass (null: the recipe's first)")
    threshold: Num = Field(1.0, description="passing: the verify reward is at least this")
    keep: Literal["all", "best", "shortest"] = Field("all", description="of a prompt's passing samples: all, the "
                                                     "best total reward, or the shortest")
    batch_prompts: int = Field(32, gt=0, description="prompts per shard written (a crash loses at most one shard)")
    output: Str | None = Field(None, description="the data set folder (null: output_dir/distilled)")


class Config(_Section):
    """A whole run. `steps` counts optimizer updates on fresh rollouts."""

    output_dir: Str = Field("runs/default", description="the run directory")
    steps: int = Field(100, gt=0, description="optimizer updates on fresh rollouts")
    seed: int = Field(0, description="seed of sampling, initialisation and data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible, else cpu")
    model: ModelConfig = Field(ModelConfig(), description=ModelConfig.__doc__)
    data: DataConfig = Field(DataConfig(), description=DataConfig.__doc__)
    rollout: RolloutConfig = Field(RolloutConfig(), description=RolloutConfig.__doc__)
    rewards: list[RewardConfig] = Field([], description="the reward functions (at least one)")
    scoring: ScoringConfig = Field(ScoringConfig(), description=ScoringConfig.__doc__)
    algo: AlgoConfig = Field(AlgoConfig(), description=AlgoConfig.__doc__)
    optim: OptimConfig = Field(OptimConfig(), description=OptimConfig.__doc__)
    deepspeed: DeepSpeedConfig = Field(DeepSpeedConfig(), description=DeepSpeedConfig.__doc__)
    eval: EvalConfig = Field(EvalConfig(), description=EvalConfig.__doc__)
    log: LogConfig = Field(LogConfig(), description=LogConfig.__doc__)
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description=CheckpointConfig.__doc__)
    sft: SFTConfig = Field(SFTConfig(), description=SFTConfig.__doc__)
    distill: DistillConfig = Field(DistillConfig(), description=DistillConfig.__doc__)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.rewards:
            raise _Bad("rewards", "at least one reward is required")
        if self.model.lora.r and self.deepspeed.zero_stage == 3:
            raise _Bad("model.lora.r", "LoRA runs with deepspeed.zero_stage 0-2 (the frozen base is not worth "
                       "sharding, and the merged weights the engines get are taken from whole layers)")
        if self.log.push_to_hub and not self.checkpoint.save_final_model:
            raise _Bad("log.push_to_hub", "needs checkpoint.save_final_model=true (the final folder is pushed)")
        return self

    def layout(self) -> str:
        """`optim.layout` resolved: `auto` is `prefix`, except under eager attention, which grpo.algo.prefix_attention
        cannot shape (it wraps only transformers' registered attention functions)."""
        if self.optim.layout != "auto":
            return self.optim.layout
        return "padded" if self.model.attn_implementation == "eager" else "prefix"

    def zero_stage_run(self) -> int:
        """The ZeRO stage DeepSpeed runs: bf16 at stage 0 runs as stage 1, DeepSpeed's BF16_Optimizer (fp32 gradient
        sums and master weights, the latter and Adam's moments sharded over the ranks;
        grpo.runtime.deepspeed_setup.ds_config)."""
        z = self.deepspeed.zero_stage
        return 1 if self.model.dtype == "bfloat16" and z == 0 else z

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
            raise ConfigError(f"optim.micro_batch_size={o.micro_batch_size} does not divide the {seqs} sequences "
                              "each rank trains on per step (rollout.prompts_per_step/world_size x "
                              "rollout.num_generations)")
        return BatchShape(world_size, prompts, seqs, seqs // o.micro_batch_size)


@dataclass(frozen=True)
class BatchShape:
    world_size: int
    prompts_per_rank: int
    seqs_per_rank: int
    grad_accum: int  # micro-batches per optimizer step on each rank


def _sections(cls: type[BaseModel]) -> dict[str, type[_Section]]:
    """The model types of `cls`'s fields (a list's item type for lists), by field name."""
    tps = {k: typing.get_args(f.annotation)[0] if typing.get_origin(f.annotation) is list else f.annotation
           for k, f in cls.model_fields.items()}
    return {k: tp for k, tp in tps.items() if isinstance(tp, type) and issubclass(tp, _Section)}


for _k, _cls in _sections(Config).items():
    _cls.at = _k + "[]" * (_k == "rewards")
VLLMConfig.at = "rollout.vllm"

# TRL GRPOConfig's names for the same settings, for the options table (tests check that each exists in trl).
TRL_NAMES: dict[str, tuple[str, ...]] = {
    "output_dir": ("output_dir",), "steps": ("max_steps",), "seed": ("seed",),
    "model.gradient_checkpointing": ("gradient_checkpointing",), "rollout.engine": ("use_vllm", "vllm_mode"),
    "rollout.num_generations": ("num_generations",), "rollout.max_new_tokens": ("max_completion_length",),
    "rollout.max_turns": ("max_tool_calling_iterations",),
    "rollout.temperature": ("temperature",), "rollout.top_p": ("top_p",), "rollout.dynamic_sampling": (),  # DAPO
    "rollout.vllm.gpu_memory_utilization": ("vllm_gpu_memory_utilization",),
    "rollout.vllm.max_model_len": ("vllm_max_model_length",), "rollout.vllm.sleep": ("vllm_enable_sleep_mode",),
    "rewards[].weight": ("reward_weights",), "algo.advantage": ("scale_rewards",), "algo.clip_low": ("epsilon",),
    "algo.clip_high": ("epsilon_high",), "algo.loss_agg": ("loss_type",), "algo.beta": ("beta",),
    "algo.num_iterations": ("num_iterations",), "algo.ratio": ("importance_sampling_level",),
    "algo.tis": ("vllm_importance_sampling_correction",), "algo.tis_cap": ("vllm_importance_sampling_cap",),
    "algo.tis_mode": ("vllm_importance_sampling_mode",), "optim.lr": ("learning_rate",),
    "optim.weight_decay": ("weight_decay",), "optim.betas": ("adam_beta1", "adam_beta2"),
    "optim.warmup_steps": ("warmup_steps",), "optim.schedule": ("lr_scheduler_type",),
    "optim.max_grad_norm": ("max_grad_norm",), "optim.micro_batch_size": ("per_device_train_batch_size",),
    "eval.every": ("eval_steps",), "log.wandb": ("report_to",), "log.push_to_hub": ("push_to_hub", "hub_model_id"),
    "checkpoint.every": ("save_steps",), "checkpoint.keep": ("save_total_limit",),
}


# ---------------------------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a recipe, apply dotted overrides, validate. Raises ConfigError naming the file and the key."""
    where, raw = ("defaults" if path is None else str(Path(path))), {}
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"recipe not found: {where}")
    try:
        if path is not None:
            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError("the top level must be a mapping of sections")
        for ov in overrides:
            _apply_override(raw, ov)
        try:
            return Config.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_message(e, Config)) from None
    except ConfigError as e:  # every line starts with where it came from
        raise ConfigError("\n".join(f"{where}: {line}" for line in str(e).splitlines())) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    *sections, last = key.split(".")
    for part in sections:
        raw = raw.setdefault(part, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    raw[last] = parsed


_WHAT = {"int_type": "expected an integer", "bool_type": "expected true/false", "float_type": "expected a number",
         "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
         "model_type": "expected a mapping", "literal_error": "must be one of {expected}",
         "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
         "less_than_equal": "must be <= {le}"}


def _message(e: ValidationError, model: type[BaseModel], at: str = "") -> str:
    """One line per error: the dotted key (list items as [i]), then what is wrong with the value."""
    lines = []
    for err in e.errors(include_url=False):
        loc, ctx = list(err["loc"]), err.get("ctx") or {}
        loc += [ctx["error"].key] if isinstance(ctx.get("error"), _Bad) else []
        key = at
        for part in loc:
            key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
        if err["type"] == "extra_forbidden":
            section = model
            for part in (p for p in loc[:-1] if isinstance(p, str)):
                section = _sections(section)[part]
            known = ", ".join(f.alias or n for n, f in section.model_fields.items())
            lines.append(f"unknown key {key} (known: {known})")
        elif "error" in ctx:
            lines.append(f"{key}: {ctx['error']}")
        else:
            what = _WHAT[err["type"]].format(**ctx) if err["type"] in _WHAT else err["msg"]
            lines.append(f"{key}: {what}, got {err['input']!r}")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain builtins (YAML- and JSON-dumpable), sections as nested dicts."""
    return cfg.model_dump(by_alias=True)
