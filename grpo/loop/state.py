"""Set-up of a run: everything that can fail on bad input fails here, before the first rollout.

`setup(cfg)` returns a `RunState`: this rank's place in the job, the data, the rewards, the learner (DeepSpeed
engine and reference) and the rollout engine. The loop in grpo/loop/train.py reads it; phases return what they
produce instead of writing into it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grpo.algo import prefix_attention
from grpo.config import Config, ConfigError
from grpo.data import PromptSet, load_rows, render
from grpo.loop.update import Learner
from grpo.rollout.base import RolloutEngine, stop_ids
from grpo.rollout.hf import HFEngine
from grpo.rollout.multiturn import ToolRollout
from grpo.rollout.tools import Tool, load_tool
from grpo.runtime import lora
from grpo.runtime.deepspeed_setup import (
    build_policy_engine,
    build_reference,
    check_device_options,
    init_distributed,
    pick_device,
)
from grpo.runtime.export import check_hub_token_on_rank0
from grpo.runtime.model import load_model, load_tokenizer, resolve_model_path
from rewards.pool import WorkerPool
from rewards.runner import Reward, build_rewards, check_columns


@dataclass
class RunState:
    device: str  # cpu | cuda
    rank: int
    world: int
    tok: Any  # the tokenizer
    prompts: PromptSet  # training prompts
    held: PromptSet | None  # held-out prompts (None: data.num_eval = 0)
    rewards: list[Reward]
    learner: Learner
    rollout: RolloutEngine
    model_path: str
    pool: WorkerPool | None  # reward worker processes (None: scoring.workers = 0)
    tool_pool: WorkerPool | None = None  # tool worker processes (None: no rollout.tools)

    @property
    def policy(self):
        """The policy's DeepSpeed engine (the generation side is `rollout`)."""
        return self.learner.policy

    def close(self) -> None:
        for pool in (self.pool, self.tool_pool):
            if pool is not None:
                pool.close()


def setup(cfg: Config) -> RunState:
    """Devices, rewards, data, model, DeepSpeed engine and rollout engine, checked against each other."""
    device = pick_device(cfg.device)
    check_device_options(cfg, device)
    try:
        rewards = build_rewards(cfg.rewards)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model_path = resolve_model_path(cfg.model.path)
    if any(r.name == "code_tests" for r in rewards):
        from rewards.sandbox import SandboxUnavailable, check_available

        try:
            check_available()
        except SandboxUnavailable as e:
            raise ConfigError(f"rewards: code_tests cannot run: {e}") from None
    tools = load_tools(cfg.rollout.tools)
    # Scoring and tool workers are spawned (never forked), so they may start after CUDA or the process group exist.
    pool = WorkerPool(cfg.scoring.workers, cfg.scoring.memory_mb) if cfg.scoring.workers > 0 else None
    tool_pool = WorkerPool(cfg.rollout.tool_workers, cfg.scoring.memory_mb) if tools else None
    rank, world = init_distributed(device)
    shape = cfg.check_batch(world)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    m = cfg.model
    tok = load_tokenizer(model_path, m.revision, m.trust_remote_code)
    check_hub_token_on_rank0(cfg.log.push_to_hub)
    train_rows, eval_rows = load_rows(cfg.data)
    prompts = render(train_rows, cfg.data, tok)
    held = render(eval_rows, cfg.data, tok) if eval_rows else None
    try:
        check_columns(rewards, prompts.columns)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    if len(prompts.rows) < cfg.rollout.prompts_per_step:
        raise ConfigError(f"data: {len(prompts.rows)} training prompts, fewer than rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}")
    model = load_model(model_path, m.dtype, m.attn_implementation, m.revision, m.trust_remote_code, m.lora.quantize)
    if m.lora.r:
        model = lora.apply(model, m.lora)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = build_policy_engine(_layout_ready(cfg, model), cfg, cfg.optim.micro_batch_size, shape.grad_accum)
    ref = None
    if cfg.algo.beta > 0:
        ref = load_model(model_path, m.dtype, m.attn_implementation, m.revision, m.trust_remote_code, m.lora.quantize)
        ref = build_reference(_layout_ready(cfg, ref), cfg, cfg.optim.micro_batch_size, shape.grad_accum)
        ref.to(engine.device)
    check_lengths(cfg, model, prompts)
    rollout = build_rollout(cfg, engine.module, tok, model_path, device, rank, world, prompts.rows[0]["prompt_ids"],
                            getattr(engine.optimizer, "parameter_offload", None))
    if tool_pool is not None:
        rollout = ToolRollout(rollout, tok, tools, cfg.rollout.max_turns, cfg.rollout.tool_timeout,
                              cfg.rollout.max_tool_output_tokens, tool_pool)
    return RunState(device, rank, world, tok, prompts, held, rewards, Learner(engine, ref, shape, tok.pad_token_id),
                    rollout, model_path, pool, tool_pool)


def load_tools(specs: list[str]) -> list[Tool]:
    """The recipe's tools, each checked now (a name that does not import fails here, naming the key)."""
    tools = []
    for i, spec in enumerate(specs):
        try:
            tools.append(load_tool(spec))
        except ValueError as e:
            raise ConfigError(f"rollout.tools[{i}]: {e}") from None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"rollout.tools: two tools share a name ({', '.join(names)}): a call could not say which")
    if "python" in names:
        from rewards.sandbox import SandboxUnavailable, check_available

        try:
            check_available()
        except SandboxUnavailable as e:
            raise ConfigError(f"rollout.tools: python cannot run: {e}") from None
    return tools


def _layout_ready(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """The prefix layout's attention, switched on at start-up (a model it cannot shape fails here, not mid-run)."""
    if cfg.layout() == "prefix":
        try:
            prefix_attention.enable(model)
        except ValueError as e:
            raise ConfigError(f"optim.layout: {e}") from None
    return model


def check_lengths(cfg: Config, model: torch.nn.Module, prompts: PromptSet) -> None:
    """A prompt plus its completion must fit the model's context: fail at start-up, not at the first long prompt."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(r["prompt_ids"]) for r in prompts.rows)
    new = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
    if limit is not None and longest + new > limit:
        raise ConfigError(f"rollout.max_new_tokens: the longest prompt ({longest} tokens) plus {new} new tokens "
                          f"exceeds the model's context of {limit} tokens (max_position_embeddings)")
    asked = cfg.rollout.vllm.max_model_len
    if cfg.rollout.engine != "hf" and asked is not None:
        if limit is not None and asked > limit:
            raise ConfigError(f"rollout.vllm.max_model_len={asked} exceeds the model's context of {limit} tokens "
                              "(max_position_embeddings)")
        if longest + new > asked:
            raise ConfigError(f"rollout.vllm.max_model_len={asked} is shorter than the longest prompt "
                              f"({longest} tokens) plus {new} new tokens")


def build_rollout(cfg: Config, model: torch.nn.Module, tok, model_path: str, device: str, rank: int, world: int,
                  probe_prompt: list[int], zero3_offload: Any = None) -> RolloutEngine:
    """The rollout engine the recipe names (see grpo/rollout/base.py for the interface)."""
    if cfg.rollout.engine == "hf":
        return HFEngine(model, tok, cfg.rollout.generation_batch_size, gather_zero3=cfg.deepspeed.zero_stage == 3,
                        zero3_offload=zero3_offload)
    from grpo.rollout.vllm_engine import VLLMEngine, probe_ids

    probe = probe_ids(tok, probe_prompt)
    if cfg.rollout.engine == "vllm":
        return VLLMEngine(cfg, model_path, tok, device, rank, world, stop_ids(tok, model), probe,
                          getattr(model.config, "max_position_embeddings", None))
    from grpo.rollout.server import ServerEngine, ServerError

    if not cfg.rollout.vllm.servers:  # checked here, not in the recipe: launchers (multinode.slurm) fill it in
        raise ConfigError("rollout.vllm.servers: required with rollout.engine=vllm_server (the URLs `grpo serve` "
                          "prints, e.g. rollout.vllm.servers=[http://node7:8000])")
    try:
        return ServerEngine(cfg, tok, rank, world, stop_ids(tok, model), probe)
    except ServerError as e:
        raise ConfigError(f"rollout.vllm.servers: {e}") from None
