"""Rollout engines: G completions per prompt, with token ids, sampling logprobs and a finish reason.

Interface (kept stable; the vLLM engines implement the same):
    engine.generate(prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]
    engine.sync(model, version) -> dict[str, float]  # make the engine sample from the trainer's current weights
                                             # (`version`: the optimizer steps they include, for the records);
                                             # returns what the sync measured (metrics), {} when nothing to do
    engine.release() -> None     # free memory while the trainer updates (colocated vLLM; a no-op elsewhere)

Implementations: grpo/rollout/hf.py (transformers' `generate` on the trainer's own module), grpo/rollout/vllm_engine.py
(vLLM in the trainer's process), grpo/rollout/server.py (`vllm serve` processes). The loop reads them through a
rollout source (grpo/rollout/source.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # completion token ids, the stop token included when there is one
    text: str  # decoded without special tokens
    logprobs: list[float]  # engine's sampling logprob of each token (after temperature/top-p)
    finish_reason: str  # "stop" | "length"
    version: int | None = None  # the engine's weight version it was sampled with (server mode; None: current)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]: ...

    def sync(self, model: torch.nn.Module, version: int = 0) -> dict[str, float]: ...

    def release(self) -> None:
        """Free what the engine holds while the trainer updates (a no-op where nothing can be freed)."""


def stop_ids(tokenizer, model) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
