"""`HFEngine`: transformers' `generate` on the trainer's own module, so its weights are always current and `sync`
has nothing to copy (under ZeRO-3 the shards are gathered for the duration of a rollout).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from grpo.rollout.base import Completion, SamplingParams, cut_at_stop, stop_ids


class _SampledLogprobs(LogitsProcessor):
    """Runs last in the processor list, so it sees the distribution actually sampled from. It keeps one step of
    normalised scores and reads the chosen token at the next call: memory is one [B, V] tensor, not [steps, B, V]."""

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _take(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, chosen[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._take(last_tokens)
        self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)


def generation_config(params: SamplingParams, eos_ids: list[int], pad: int) -> GenerationConfig:
    """transformers' settings for one `generate` call. Temperature and top-p are applied by our own logits
    processors (so the recorded logprobs are those of the distribution sampled from); here only what stays.

    Sampling: top_k=0, not None: transformers 5 reads None as "unset" and falls back to its default of 50, which
    sampled from the 50 likeliest tokens while the recorded logprobs (and the trainer's) were the full softmax's.
    Greedy: no sampling flags at all, since transformers warns at every call (each evaluation) about flags that
    greedy decoding ignores."""
    sampling = {} if params.greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if params.stop:
        sampling["stop_strings"] = list(params.stop)
    return GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, eos_token_id=eos_ids,
                            pad_token_id=pad, use_cache=True, **sampling)


class HFEngine:
    """transformers' `generate` on the trainer's own module.

    Under ZeRO-3 every parameter is gathered once per `generate` call and DeepSpeed's module hooks are taken off
    for its duration: with the hooks on, every decode step's forward gathers each layer again (a collective per
    layer per token), and ranks whose completions end at different steps wait for each other forever. Without
    them generation runs no collective at all, so each rank may stop whenever its own batch is done. `generate`
    itself stays collective (the one gather): every rank calls it, with no prompts if it has none
    (`collective_generate`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, gather_zero3: bool = False,
                 zero3_offload: Any = None):
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self.gather_zero3 = gather_zero3
        self.collective_generate = gather_zero3
        self.zero3_offload = zero3_offload  # DeepSpeed's DeepSpeedZeRoOffload (engine.optimizer.parameter_offload)
        self.eos_ids = stop_ids(tokenizer, model)

    def sync(self, model: torch.nn.Module, version: int = 0) -> dict[str, float]:
        self.model = model  # same module: the weights are the trainer's own
        return {}

    def release(self) -> None:
        """Nothing to free: the engine is the trainer's own module."""

    @contextlib.contextmanager
    def _gathered(self):
        if not self.gather_zero3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            off = self.zero3_offload
            if off is None:
                yield
                return
            # Off go the per-module hooks (gather and release around every forward) and the root's start-of-forward
            # hook, whose coordinator reset compares the module order across ranks (a collective per forward).
            for hook in [*off.forward_hooks, *off.backward_hooks, off.fwd_pre_hook]:
                hook.remove()
            off.forward_hooks, off.backward_hooks = [], []
            try:
                yield
            finally:  # back before the parameters are partitioned again, and before the next training forward
                off._register_deepspeed_module(off.module)  # also invalidates the coordinator's trace, on every rank
                coordinator = off.get_param_coordinator
                off.fwd_pre_hook = off.module.register_forward_pre_hook(
                    lambda module, *args: coordinator().reset_step(), prepend=True)  # DeepSpeed's, in its place

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        flat = [p for p in prompts for _ in range(n)]
        # Similar lengths in one generate call waste less on left padding; results go back in order.
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        results: list[Completion | None] = [None] * len(flat)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._gathered():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    for i, c in zip(idx, self._generate_batch([flat[i] for i in idx], params), strict=False):
                        results[i] = c
        finally:
            self.model.train(was_training)
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        recorder = _SampledLogprobs()
        procs = LogitsProcessorList()
        if not params.greedy:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        procs.append(recorder)
        gen_cfg = generation_config(params, self.eos_ids, pad)
        ids, mask = ids.to(device), mask.to(device)
        extra = {"tokenizer": self.tok} if params.stop else {}  # transformers matches stop strings on text
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                  logits_processor=procs, past_key_values=self._shared_prefill(ids, mask), **extra)
        new = out[:, width:].cpu()
        logps = recorder.finish(new[:, -1].to(device)).cpu() if new.shape[1] else torch.zeros(len(prompts), 0)
        completions = []
        for i, p in enumerate(prompts):
            toks = new[i].tolist()
            stop = next((j for j, t in enumerate(toks) if t in self.eos_ids), None)
            if stop is not None:
                toks, reason = toks[: stop + 1], "stop"
            else:
                reason = "length"
            toks, matched = cut_at_stop(toks, self.tok, params.stop)  # this row's stop string, if it came first
            reason = "stop" if matched is not None else reason
            text = self.tok.decode(toks, skip_special_tokens=True)
            completions.append(Completion(list(p), toks, text, logps[i, : len(toks)].tolist(), reason,
                                          stop_reason=matched))
        return completions

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every prompt but its last token, computed once per distinct prompt and fanned out to its
        copies (a batch holds each prompt n times, adjacent). `generate` then runs only the last prompt column and
        the new tokens. None when nothing is shared (then `generate` prefills as usual)."""
        if ids.shape[1] < 2:
            return None
        first = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        first[1:] = (ids[1:] != ids[:-1]).any(-1)
        if bool(first.all()):
            return None
        u_ids, u_mask = ids[first, :-1], mask[first, :-1]
        # positions as generate computes them from the mask, so the cached prefix matches what it would have built
        pos = (u_mask.cumsum(-1) - 1).clamp(min=0)
        body = getattr(self.model, self.model.base_model_prefix)  # no logits needed: skip the vocabulary head
        cache = body(input_ids=u_ids, attention_mask=u_mask, position_ids=pos, use_cache=True).past_key_values
        cache.batch_select_indices(first.cumsum(0) - 1)  # row i continues the last distinct prompt up to i
        return cache
