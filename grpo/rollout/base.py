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
    # stop strings (an inline tool call's closing tag): generation ends on the token that completes one, which is
    # kept; the completion records which one in `stop_reason`
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # completion token ids, the stop token included when there is one
    text: str  # decoded without special tokens
    logprobs: list[float]  # engine's sampling logprob of each token (after temperature/top-p)
    finish_reason: str  # "stop" | "length"
    version: int | None = None  # the engine's weight version it was sampled with (server mode; None: current)
    stop_reason: str | None = None  # the stop string that ended it (None: EOS, or the length limit)
    # multi-turn: 1 where the engine sampled the token, 0 where a tool's output was appended (its logprob is 0.0
    # there); None: every token was sampled
    mask: list[int] | None = None
    turns: list[dict] | None = None  # multi-turn: per turn its text, tokens, tool, arguments, result, error, seconds

    def sampled(self) -> int:
        """How many tokens the engine sampled: what the loss and its length normalisation count."""
        return len(self.ids) if self.mask is None else sum(self.mask)

    def sampled_logprobs(self) -> list[float]:
        """The engine's logprobs of the tokens it sampled (an appended tool answer has none)."""
        return self.logprobs if self.mask is None else [x for x, m in zip(self.logprobs, self.mask, strict=True) if m]


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


def cut_at_stop(ids: list[int], tok, stops: tuple[str, ...]) -> tuple[list[int], str | None]:
    """`ids` up to and including the token that completes the earliest stop string in their decoded text, and that
    string; `ids` unchanged and None when none occurs. Decoding is monotone in the token count, so the cut is found
    by bisection (log2(len) decodes, not one per token)."""
    if not stops or not ids:
        return ids, None
    text = tok.decode(ids, skip_special_tokens=False)
    found = [(text.find(x) + len(x), x) for x in stops if x in text]
    if not found:
        return ids, None
    end, which = min(found)
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds the stop string's end
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.decode(ids[:mid], skip_special_tokens=False)) >= end:
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], which
