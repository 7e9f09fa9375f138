"""`grpo sft RECIPE`: supervised fine-tuning, for a cold start before GRPO and for distillation (grpo/loop/distill.py).

The data are TRL's SFT formats: `prompt` + `completion` (each text, or a list of chat messages), or `messages` (a
conversation whose last turn is the assistant's answer). The loss is the mean negative logprob of the completion
tokens over the step (every rank's tokens, all micro-batches), on the same DeepSpeed engine, checkpoints,
preemption handling, metrics and final export as `grpo train`. Micro-batches are packed: sequences go one after
another in a single row with position ids restarting per sequence (transformers then keeps their attention apart),
so no token is padding, and the vocabulary projection runs in chunks over completion positions only
(grpo/algo/logprobs.py), so full-vocabulary fp32 logits never exist for the batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs
from grpo.config import Config, ConfigError
from grpo.data import PromptSampler, as_messages
from grpo.runtime import collectives as coll

log = logging.getLogger("grpo")


def read_table(path: str) -> list[dict[str, Any]]:
    """A `save_to_disk` folder (a Dataset, or a DatasetDict's `train`), or a .parquet / .jsonl / .json file."""
    import datasets

    p = Path(path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ConfigError(f"sft.data: {p} is not a folder written by save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"sft.data: {p} has no train split (splits: {sorted(ds)})")
            ds = ds["train"]
        return ds.to_list()
    kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
    if not p.is_file() or p.suffix not in kinds:
        raise ConfigError(f"sft.data: {p} is neither a save_to_disk folder nor a .parquet/.jsonl/.json file")
    return datasets.load_dataset(kinds[p.suffix], data_files=str(p), split="train").to_list()


def tokenize_row(row: dict[str, Any], i: int, tok) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one row. Conversations go through the chat template: the prompt with the
    generation prompt (exactly what `grpo train` and `grpo eval` feed the model), the completion as the rest of
    the templated conversation up to the end-of-turn token."""
    where = f"sft.data: row {i}"
    if "messages" in row and row["messages"] is not None:
        msgs = as_messages(row["messages"], f"{where} column 'messages'")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: 'messages' must end with an assistant turn (the completion)")
        prompt, completion = msgs[:-1], msgs[-1:]
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
    else:
        raise ConfigError(f"{where} has neither 'prompt' and 'completion' nor 'messages' columns (columns: "
                          f"{sorted(row)})")
    p_msgs = as_messages(prompt, f"{where} column 'prompt'")
    if p_msgs is None:  # plain text: the completion is text too, ended by EOS
        if not isinstance(completion, str):
            raise ConfigError(f"{where}: a text prompt needs a text completion, got {type(completion).__name__}")
        return tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c_msgs = as_messages(completion, f"{where} column 'completion'")
    if c_msgs is None:
        c_msgs = [{"role": "assistant", "content": completion}]
    head = tok.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(p_msgs + c_msgs, tokenize=False)
    if not full.startswith(head):
        raise ConfigError(f"{where}: the chat template renders the conversation differently from its prompt, so "
                          "the completion cannot be cut out of it")
    ids = tok(full[len(head):], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id in ids:  # what follows the end of the turn (a newline) is never generated
        ids = ids[: ids.index(tok.eos_token_id) + 1]
    return tok(head, add_special_tokens=False)["input_ids"], ids


def load_examples(cfg: Config, tok, context: int | None = None) -> list[Sequence]:
    """Every row tokenized and checked: rows with no completion tokens, or longer than `sft.max_length` or the
    model's `context`, fail here by row number, before the model loads (never cut, never skipped in silence)."""
    s = cfg.sft
    limit, what = s.max_length, f"sft.max_length={s.max_length}"
    if context is not None and context < limit:
        limit, what = context, f"the model's context of {context} tokens"
    if not s.data:
        raise ConfigError("sft.data: required by grpo sft (a save_to_disk folder or a .parquet/.jsonl/.json file)")
    rows = read_table(s.data)
    if not rows:
        raise ConfigError(f"sft.data: {s.data} has no rows")
    out, empty, long, no_prompt = [], [], [], []
    for i, row in enumerate(rows):
        p, c = tokenize_row(row, i, tok)
        if not p:  # the first completion token needs a position before it
            no_prompt.append(i)
        if not c:
            empty.append(i)
        elif len(p) + len(c) > limit:
            long.append(f"{i} ({len(p) + len(c)} tokens)")
        if not s.completion_only_loss and p:
            p, c = p[:1], p[1:] + c  # every token after the first is a target
        out.append(Sequence(p, c))

    def some(xs):
        return ", ".join(map(str, xs[:10])) + (f" and {len(xs) - 10} more" if len(xs) > 10 else "")

    if empty:
        raise ConfigError(f"sft.data: rows with no completion tokens: {some(empty)}")
    if no_prompt:
        raise ConfigError(f"sft.data: rows whose prompt has no tokens (this tokenizer adds no BOS): "
                          f"{some(no_prompt)}")
    if long:
        raise ConfigError(f"sft.data: rows longer than {what} (prompt + completion): {some(long)}; drop them, "
                          "or raise sft.max_length (within the model's context)")
    return out


@dataclass
class SFTShape:
    per_rank: int  # sequences per rank per step
    micro: int  # sequences per micro-batch
    grad_accum: int  # micro-batches per step
    steps: int


def sft_shape(cfg: Config, n: int, world: int) -> SFTShape:
    b = cfg.sft.batch_size
    if b % world:
        raise ConfigError(f"sft.batch_size={b} is not divisible by the {world} training processes")
    per_rank = b // world
    micro = min(cfg.optim.micro_batch_size, per_rank)
    return SFTShape(per_rank, micro, math.ceil(per_rank / micro), max(1, math.ceil(cfg.sft.epochs * n / b)))


def sft_step(engine, seqs: list[Sequence], shape: SFTShape, world: int, pad_id: int, chunk: int) -> dict[str, float]:
    """One optimizer step on this rank's sequences: mean negative logprob over every rank's completion tokens."""
    from grpo.runtime.deepspeed_setup import forward_in_engine, recorded_grad_norm, stage0_grad_norm

    tokens, seen = coll.all_sum([float(sum(len(s.completion_ids) for s in seqs)),
                                 float(sum(len(s.prompt_ids) + len(s.completion_ids) for s in seqs))])
    loss_sum, norm = 0.0, None
    engine.module.train()
    for k in range(shape.grad_accum):
        part = seqs[k * shape.micro : (k + 1) * shape.micro]
        if not part:  # every rank runs every micro-step (ZeRO's collectives), with a zero loss
            engine.backward(sum(p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
                            scale_wrt_gas=False)
        else:
            mb = build_micro_batch(part, pad_id, "packed", engine.device)
            lp = forward_in_engine(engine, lambda m, mb=mb: completion_logprobs(m, mb, 1.0, chunk)[0])
            loss = -lp.float().sum() / tokens
            loss_sum += loss.item()
            engine.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages gradients over the ranks
        if k == shape.grad_accum - 1 and engine.zero_optimization_stage() == 0:
            norm = stage0_grad_norm(engine)
        engine.step()
    return {"loss": coll.all_sum([loss_sum])[0], "completion_tokens": tokens, "tokens": seen,
            "grad_norm": norm if norm is not None else recorded_grad_norm(engine), "lr": engine.get_lr()[0]}


def sft_setup(cfg: Config):
    """Device, tokenizer, examples, the batch shape and the DeepSpeed engine; `cfg` with the schedule's horizon
    (one update per step: algo.num_iterations is GRPO's)."""
    import random

    import numpy as np
    from transformers import AutoConfig

    from grpo.runtime.deepspeed_setup import build_policy_engine, check_device_options, init_distributed, pick_device
    from grpo.runtime.model import hub_kwargs, load_model, load_tokenizer, resolve_model_path

    device = pick_device(cfg.device)
    check_device_options(cfg, device)
    m = cfg.model
    model_path = resolve_model_path(m.path)
    tok = load_tokenizer(model_path, m.revision, m.trust_remote_code)
    context = getattr(AutoConfig.from_pretrained(model_path, **hub_kwargs(model_path, m.revision,
                                                                          m.trust_remote_code)),
                      "max_position_embeddings", None)
    examples = load_examples(cfg, tok, context)
    rank, world = init_distributed(device)
    shape = sft_shape(cfg, len(examples), world)
    cfg = cfg.model_copy(update={"steps": shape.steps, "algo": cfg.algo.model_copy(update={"num_iterations": 1})})
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    model = load_model(model_path, m.dtype, m.attn_implementation, m.revision, m.trust_remote_code, m.lora.quantize)
    if m.lora.r:
        from grpo.runtime import lora
        model = lora.apply(model, m.lora)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = build_policy_engine(model, cfg, shape.micro, shape.grad_accum)
    return cfg, device, tok, examples, rank, world, shape, engine


def sft(cfg: Config) -> Path:
    """Set up, resume if a checkpoint is there, train for `sft.epochs`, export `final/` (grpo/loop/run.py)."""
    from grpo.loop.run import Job, run_loop
    from grpo.runtime.tracking import peak_memory_gib

    cfg, device, tok, examples, rank, world, shape, engine = sft_setup(cfg)
    sampler = PromptSampler(len(examples), cfg.seed)

    def begin(start: int, metrics) -> None:
        if metrics is not None:
            log.info("sft: %d examples, %d steps of %d sequences (%d micro-batches of %d per rank)", len(examples),
                     shape.steps, cfg.sft.batch_size, shape.grad_accum, shape.micro)

    def step(n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        idx = sampler.take(cfg.sft.batch_size)[rank * shape.per_rank : (rank + 1) * shape.per_rank]
        rec = sft_step(engine, [examples[i] for i in idx], shape, world, tok.pad_token_id or 0,
                       cfg.optim.logprob_chunk_size)
        dt = time.perf_counter() - t0
        return {"step": n, **rec, "epoch": sampler.epoch + sampler.pos / sampler.size, "time/step": dt,
                "tokens_per_second": rec["tokens"] / dt, "memory/peak_gib": peak_memory_gib(device)}

    def line(rec: dict[str, Any], total: int) -> str:
        return f"sft step {rec['step']}/{total} loss {rec['loss']:.4f} {rec['tokens_per_second']:.0f} tokens/s"

    return run_loop(Job(cfg, engine, tok, rank, world, sampler, shape.steps, step, sampler.state, line,
                        begin=begin))
