"""The GRPO loop. One step, in the order data flows:

    rollout (G completions per prompt) -> rewards -> advantages -> logprobs -> update -> sync -> log -> checkpoint

Every rank samples its own share of prompts (groups never straddle ranks), so advantages are local; only the
loss normalisers (global token and sequence counts) and the logged statistics cross ranks.
Deliberately left out of the default: the reference model (beta = 0) and the second forward for old logprobs
(one pass per batch makes the ratio exactly 1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from grpo import checkpoint as ckpt
from grpo import collectives as coll
from grpo.advantages import ADVANTAGES, zero_variance_groups
from grpo.config import Config, ConfigError, to_dict
from grpo.data import PromptSampler, PromptSet, load_rows, render
from grpo.engine import (
    build_policy_engine,
    build_reference,
    check_device_options,
    forward_in_engine,
    init_distributed,
    pick_device,
)
from grpo.export import check_hub_token_on_rank0, push_to_hub, save_final
from grpo.logprobs import Sequence, build_micro_batch, completion_logprobs
from grpo.loss import policy_loss, token_weights, truncated_is_weights
from grpo.model import load_model, load_tokenizer, resolve_model_path
from grpo.rollout import Completion, HFEngine, SamplingParams, stop_ids
from grpo.tracking import Metrics, write_records
from rewards.pool import WorkerPool
from rewards.runner import Reward, Scores, TrainerState, build_rewards, check_columns, score

log = logging.getLogger("grpo")


@dataclass
class Group:
    row: dict[str, Any]
    completions: list[Completion]
    rewards: dict[str, list[float]]  # per reward function (NaN: not applicable / errored)
    total: list[float]  # NaN: a reward errored for that sample
    advantages: list[float]


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ set-up

def setup(cfg: Config) -> dict[str, Any]:
    """Everything that can fail on bad input fails here, before the first rollout."""
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
    # Scoring workers are spawned before CUDA or the process group exist.
    pool = WorkerPool(cfg.scoring.workers, cfg.scoring.memory_mb) if cfg.scoring.workers > 0 else None
    rank, world = init_distributed(device)
    shape = cfg.check_batch(world)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    tok = load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code)
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
    model = load_model(model_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.revision,
                       cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = build_policy_engine(model, cfg, cfg.optim.micro_batch_size, shape.grad_accum)
    ref = None
    if cfg.algo.beta > 0:
        ref = build_reference(load_model(model_path, cfg.model.dtype, cfg.model.attn_implementation,
                                         cfg.model.revision, cfg.model.trust_remote_code), cfg,
                              cfg.optim.micro_batch_size, shape.grad_accum)
        ref.to(engine.device)
    check_lengths(cfg, model, prompts)
    rollout = build_rollout(cfg, engine.module, tok, model_path, device, rank, world, prompts.rows[0]["prompt_ids"],
                            getattr(engine.optimizer, "parameter_offload", None))
    return dict(device=device, rank=rank, world=world, shape=shape, tok=tok, prompts=prompts, held=held,
                rewards=rewards, engine=engine, ref=ref, rollout=rollout, model_path=model_path, pool=pool)


def check_lengths(cfg: Config, model: torch.nn.Module, prompts) -> None:
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
                  probe_prompt: list[int], zero3_offload: Any = None):
    """The rollout engine the recipe names (see grpo/rollout.py for the interface)."""
    if cfg.rollout.engine == "hf":
        return HFEngine(model, tok, cfg.rollout.generation_batch_size, gather_zero3=cfg.deepspeed.zero_stage == 3,
                        zero3_offload=zero3_offload)
    from grpo.vllm_engine import VLLMEngine, probe_ids

    probe = probe_ids(tok, probe_prompt)
    if cfg.rollout.engine == "vllm":
        return VLLMEngine(cfg, model_path, tok, device, rank, world, stop_ids(tok, model), probe,
                          getattr(model.config, "max_position_embeddings", None))
    from grpo.serve import ServerEngine, ServerError

    if not cfg.rollout.vllm.servers:  # checked here, not in the recipe: launchers (multinode.slurm) fill it in
        raise ConfigError("rollout.vllm.servers: required with rollout.engine=vllm_server (the URLs `grpo serve` "
                          "prints, e.g. rollout.vllm.servers=[http://node7:8000])")
    try:
        return ServerEngine(cfg, tok, rank, world, stop_ids(tok, model), probe)
    except ServerError as e:
        raise ConfigError(f"rollout.vllm.servers: {e}") from None


# ------------------------------------------------------------------------------------------------ phases

def score_groups(rows: list[dict[str, Any]], comps: list[list[Completion]], rewards: list[Reward],
                 prompts: PromptSet, advantage: str, pool: WorkerPool | None = None,
                 state: TrainerState | None = None) -> tuple[list[Group], Scores]:
    """Score every completion with TRL's calling convention (prompts, completions as text or as assistant messages
    for a conversational data set, completion ids, the row's columns), then group-relative advantages."""
    flat = [c for g in comps for c in g]
    G = len(comps[0])
    cols = {k: [row[k] for row, g in zip(rows, comps, strict=True) for _ in g] for k in prompts.columns}
    cols["prompts"] = [row["prompt_messages"] if prompts.conversational else row["prompt"]
                       for row, g in zip(rows, comps, strict=True) for _ in g]
    cols["completion_ids"] = [c.ids for c in flat]
    cols["num_tokens"] = [len(c.ids) for c in flat]
    cols["finish_reason"] = [c.finish_reason for c in flat]
    texts = [c.text for c in flat]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if prompts.conversational else texts
    s = score(rewards, completions, cols, pool, state, group_size=G)
    total = torch.tensor(s.total, dtype=torch.float64).view(len(rows), G)
    adv = ADVANTAGES[advantage](total)
    groups = []
    for i, (row, g) in enumerate(zip(rows, comps, strict=False)):
        sl = slice(i * G, (i + 1) * G)
        groups.append(Group(row, g, {k: v[sl] for k, v in s.per_reward.items()}, s.total[sl],
                            adv[i].tolist()))
    for m in s.error_messages:
        log.warning("reward error: %s", m)
    return groups, s


def collect(cfg: Config, st: dict[str, Any], sampler: PromptSampler, timer: Timer) -> tuple[list[Group], int]:
    """Rollouts for one step on this rank. With dynamic sampling, zero-variance groups are dropped and more prompts
    sampled (all ranks take the same number of rounds, so the sampler stays aligned); returns (groups, rounds)."""
    r, rank, shape = cfg.rollout, st["rank"], st["shape"]
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    rows_all = st["prompts"].rows
    kept: list[Group] = []
    spare: list[Group] = []
    rounds = 0
    while True:
        idx = sampler.take(r.prompts_per_step)
        mine = [rows_all[i] for i in idx[rank * shape.prompts_per_rank : (rank + 1) * shape.prompts_per_rank]]
        with timer("generate"):
            comps = st["rollout"].generate([row["prompt_ids"] for row in mine], r.num_generations, params)
        with timer("score"):
            state = TrainerState(st["step"], cfg.steps, sampler.epoch + sampler.pos / max(sampler.size, 1))
            groups, sc = score_groups(mine, comps, st["rewards"], st["prompts"], cfg.algo.advantage, st["pool"],
                                      state)
        for k in sc.errors:
            st["reward_errors"][k] = st["reward_errors"].get(k, 0) + sc.errors[k]
            st["reward_timeouts"][k] = st["reward_timeouts"].get(k, 0) + sc.timeouts[k]
        rounds += 1
        if not r.dynamic_sampling:
            return groups, rounds
        flat = zero_variance_groups(torch.tensor([g.total for g in groups]))
        kept += [g for g, z in zip(groups, flat.tolist(), strict=False) if not z]
        spare += [g for g, z in zip(groups, flat.tolist(), strict=False) if z]
        if not coll.any_rank(len(kept) < shape.prompts_per_rank) or rounds >= r.max_sampling_rounds:
            break
    kept = (kept + spare)[: shape.prompts_per_rank]  # top up with no-signal groups only if rounds ran out
    return kept, rounds


def update(cfg: Config, st: dict[str, Any], groups: list[Group], timer: Timer) -> dict[str, float]:
    """Logprobs, loss, backward and optimizer step(s) on this rank's groups."""
    engine, world = st["engine"], st["world"]
    model = engine.module
    seqs, adv, eng_lp, valid, refs = [], [], [], [], []
    for g in groups:
        for c, a, tot in zip(g.completions, g.advantages, g.total, strict=True):
            if not c.ids:  # an empty completion has no token to learn from
                continue
            refs.append(c)
            seqs.append(Sequence(c.prompt_ids, c.ids))
            adv.append(a)
            eng_lp.append(c.logprobs)
            valid.append(not math.isnan(tot))
    n_tok = sum(len(s.completion_ids) for s, v in zip(seqs, valid, strict=False) if v)
    global_tokens, global_seqs = coll.all_sum([n_tok, sum(valid)])
    global_tokens, global_seqs = max(global_tokens, 1.0), max(global_seqs, 1.0)

    # The gradient does not depend on the order. `prefix` keeps groups together (one prompt forward per group);
    # the other layouts sort by length so each micro-batch pads little.
    layout = cfg.layout()
    order = list(range(len(seqs)))
    if layout != "prefix":
        order.sort(key=lambda i: len(seqs[i].prompt_ids) + len(seqs[i].completion_ids))
    mbs = cfg.optim.micro_batch_size
    chunks = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    chunks += [[] for _ in range(st["shape"].grad_accum - len(chunks))]  # empty completions were skipped
    device = engine.device
    temp = cfg.rollout.temperature
    batches = [build_micro_batch([seqs[i] for i in ch], st["tok"].pad_token_id, layout, device) if ch else None
               for ch in chunks]

    need_old = cfg.algo.num_iterations > 1
    old_lp: list[torch.Tensor | None] = [None] * len(chunks)
    ref_lp: list[torch.Tensor | None] = [None] * len(chunks)
    if need_old or st["ref"] is not None:
        with timer("logprobs"), torch.no_grad():
            for k, mb in enumerate(batches):
                if mb is None:
                    continue
                if need_old:
                    old_lp[k] = forward_in_engine(
                        engine, lambda m, mb=mb: completion_logprobs(m, mb, temp, cfg.optim.logprob_chunk_size)[0])
                if st["ref"] is not None:
                    ref_lp[k] = completion_logprobs(st["ref"], mb, temp, cfg.optim.logprob_chunk_size)[0]

    stats = {"pg_loss": 0.0, "kl": 0.0, "clipped": 0.0, "clip_tokens": 0.0, "entropy_sum": 0.0,
             "mismatch_sum": 0.0, "mismatch_max": 0.0, "tokens": 0.0, "tis_cut": 0.0}
    grad_norms = []
    model.train()
    for it in range(cfg.algo.num_iterations):
        pre_clip_norm = None
        with timer("update"):
            for k, (ch, mb) in enumerate(zip(chunks, batches, strict=False)):
                if mb is None:
                    loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                    engine.backward(loss, scale_wrt_gas=False)
                    engine.step()
                    continue
                ents: list[torch.Tensor] = []

                def logprobs(m, mb=mb, ents=ents):
                    lp, ent = completion_logprobs(m, mb, temp, cfg.optim.logprob_chunk_size)
                    ents.append(ent)
                    return lp

                logp = forward_in_engine(engine, logprobs)
                ent = ents[0]
                seq_adv = torch.tensor([adv[i] for i in ch], dtype=torch.float32, device=device)
                seq_ok = torch.tensor([valid[i] for i in ch], dtype=torch.float32, device=device)
                w = token_weights(cfg.algo.loss_agg, mb.seq_len, global_tokens, global_seqs,
                                  cfg.rollout.max_new_tokens) * seq_ok[mb.seq_index]
                old = old_lp[k] if old_lp[k] is not None else logp.detach()
                e_lp = torch.tensor([x for i in ch for x in eng_lp[i]], dtype=torch.float32, device=device)
                isw = None
                if cfg.tis_enabled():
                    isw = truncated_is_weights(old, e_lp, cfg.algo.tis_cap, mb.seq_index, len(ch),
                                               cfg.algo.tis_level, cfg.algo.tis_mode)
                    if it == 0:
                        raw = truncated_is_weights(old, e_lp, math.inf, mb.seq_index, len(ch), cfg.algo.tis_level)
                        stats["tis_cut"] += float((raw > cfg.algo.tis_cap).sum())
                parts = policy_loss(logp, old, seq_adv[mb.seq_index], w, cfg.algo.clip_low, cfg.algo.clip_high,
                                    cfg.algo.beta, ref_lp[k], isw, cfg.algo.ratio, mb.seq_index, len(ch))
                # DeepSpeed averages gradients over ranks; each rank's loss is already a share of the global sum.
                engine.backward(parts.loss * world, scale_wrt_gas=False)
                if k == len(chunks) - 1 and engine.zero_optimization_stage() == 0:
                    pre_clip_norm = stage0_grad_norm(engine, model)  # DeepSpeed does not record it unscaled
                engine.step()
                stats["clipped"] += parts.clip_frac_num  # over every pass: with one pass the ratio is 1
                stats["clip_tokens"] += len(logp)
                if it == 0:
                    stats["pg_loss"] += parts.pg_loss
                    stats["kl"] += parts.kl
                    stats["entropy_sum"] += float(ent.sum())
                    diff = (logp.detach() - e_lp).abs()
                    stats["mismatch_sum"] += float(diff.sum())
                    stats["mismatch_max"] = max(stats["mismatch_max"], float(diff.max()) if len(diff) else 0.0)
                    stats["tokens"] += len(logp)
                    per_seq = torch.zeros(len(ch), device=device).index_add_(0, mb.seq_index, logp.detach().float())
                    for j, i in enumerate(ch):  # for the records: where trainer and engine disagree
                        refs[i].trainer_logprob_mean = float(per_seq[j]) / len(seqs[i].completion_ids)
        grad_norms.append(pre_clip_norm if pre_clip_norm is not None else _ds_grad_norm(engine))
    summed = coll.all_sum([stats["pg_loss"], stats["kl"], stats["clipped"], stats["entropy_sum"],
                       stats["mismatch_sum"], stats["tokens"], stats["clip_tokens"], stats["tis_cut"]])
    mismatch_max = coll.all_max([stats["mismatch_max"]])[0]
    toks = max(summed[5], 1.0)
    return {"loss/pg": summed[0], "loss/kl": summed[1], "clip_frac": summed[2] / max(summed[6], 1.0),
            "entropy": summed[3] / toks, "logprob_mismatch/mean_abs": summed[4] / toks,
            "logprob_mismatch/max_abs": mismatch_max, "logprob_mismatch/tis_cut_frac": summed[7] / toks,
            "grad_norm": grad_norms[-1],
            "lr": engine.get_lr()[0]}


def stage0_grad_norm(engine, model: torch.nn.Module) -> float:
    """The pre-clip gradient norm at ZeRO stage 0, read before `engine.step()` clears the gradients. DeepSpeed does
    not record it for fp32 there, and for fp16 its optimizer (FP16_UnfusedOptimizer with torch's AdamW) records
    the norm of the loss-scaled gradients: a logged norm 65536 times too large. Here the scale in force for this
    backward is divided out (the step may change it)."""
    sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
    return math.sqrt(sq) / scale


def _ds_grad_norm(engine) -> float:
    gn = engine.get_global_grad_norm()
    return float(gn) if gn is not None else math.nan


def evaluate(cfg: Config, st: dict[str, Any], step: int, run_dir: Path) -> dict[str, float]:
    """Accuracy and mean reward on the held-out split (split over ranks): greedy, or k samples per problem
    (then `eval/accuracy` is the mean over samples and `eval/pass@k` the share of problems solved at least once)."""
    held = st["held"]
    if held is None:
        return {}
    rank, world, k = st["rank"], st["world"], cfg.eval.num_samples
    rows = held.rows[rank::world]
    params = SamplingParams(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, cfg.eval.temperature,
                            greedy=k == 1)
    # a rank with no held-out rows still takes part when generating is collective (ZeRO-3's one gather)
    collective = getattr(st["rollout"], "collective_generate", False)
    comps = st["rollout"].generate([r["prompt_ids"] for r in rows], k, params) if rows or collective else []
    records, correct, solved, rew_sum, n = [], 0.0, 0.0, 0.0, 0
    acc_name = "accuracy" if any(r.name == "accuracy" for r in st["rewards"]) else st["rewards"][0].name
    if rows:
        groups, _ = score_groups(rows, comps, st["rewards"], held, "drgrpo", st["pool"],
                                 TrainerState(step, cfg.steps))
        for g in groups:
            hits = [g.rewards[acc_name][j] == 1.0 for j in range(k)]
            correct += sum(hits)
            solved += any(hits)
            rew_sum += sum(0.0 if math.isnan(t) else t for t in g.total)
            n += 1
            for j, c in enumerate(g.completions):
                records.append({"step": step, "prompt_id": g.row["prompt_id"], "prompt": g.row["prompt"],
                                "completion": c.text, "answer": str(g.row.get("answer", "")), "sample_index": j,
                                "correct": hits[j], "reward_total": g.total[j], "num_tokens": len(c.ids),
                                "finish_reason": c.finish_reason,
                                **{f"reward/{name}": v[j] for name, v in g.rewards.items()}})
    gathered = coll.gather_objects(records)
    total_c, total_s, total_r, total_n = coll.all_sum([correct, solved, rew_sum, n])
    if rank == 0:
        write_records(run_dir / "eval" / f"step-{step:06d}.parquet", [r for part in gathered for r in part])
    out = {"eval/accuracy": total_c / max(total_n * k, 1), "eval/reward": total_r / max(total_n * k, 1),
           "eval/num_problems": total_n}
    if k > 1:
        out[f"eval/pass@{k}"] = total_s / max(total_n, 1)
    return out


def rollout_records(step: int, groups: list[Group], policy_version: int) -> list[dict[str, Any]]:
    out = []
    for gi, g in enumerate(groups):
        for j, (c, tot, a) in enumerate(zip(g.completions, g.total, g.advantages, strict=False)):
            out.append({"step": step, "prompt_id": g.row["prompt_id"], "group_index": gi, "sample_index": j,
                        "prompt": g.row["prompt"], "completion": c.text, "answer": str(g.row.get("answer", "")),
                        **{f"reward/{k}": v[j] for k, v in g.rewards.items()}, "reward_total": tot,
                        "reward_error": math.isnan(tot), "advantage": a, "num_tokens": len(c.ids),
                        "finish_reason": c.finish_reason,
                        "engine_logprob_mean": float(np.mean(c.logprobs)) if c.logprobs else math.nan,
                        "trainer_logprob_mean": c.trainer_logprob_mean,
                        "policy_version": policy_version})
    return out


def step_metrics(groups: list[Group], world: int, rounds: int) -> dict[str, float]:
    """Reward statistics over all ranks' groups (sums reduced, then divided)."""
    names = list(groups[0].rewards) if groups else []
    tot = [t for g in groups for t in g.total]
    ok = [t for t in tot if not math.isnan(t)]
    lens = [len(c.ids) for g in groups for c in g.completions]
    trunc = [c.finish_reason == "length" for g in groups for c in g.completions]
    zero = zero_variance_groups(torch.tensor([g.total for g in groups])).sum().item() if groups else 0
    vec = [sum(ok), sum(x * x for x in ok), len(ok), len(tot), sum(lens), sum(trunc), zero, len(groups)]
    for k in names:
        vals = [v for g in groups for v in g.rewards[k] if not math.isnan(v)]
        vec += [sum(vals), sum(v * v for v in vals), len(vals)]
    s = coll.all_sum(vec)
    n_ok = max(s[2], 1.0)
    mean = s[0] / n_ok
    out = {"reward/mean": mean, "reward/std": math.sqrt(max(s[1] / n_ok - mean * mean, 0.0)),
           "reward/errors": s[3] - s[2], "completion/len_mean": s[4] / max(s[3], 1.0),
           "completion/truncated_frac": s[5] / max(s[3], 1.0), "groups/zero_variance_frac": s[6] / max(s[7], 1.0),
           "rollout/rounds": rounds}
    for i, k in enumerate(names):
        a, b, n = s[8 + 3 * i : 11 + 3 * i]
        m = a / n if n else math.nan
        out[f"reward/{k}/mean"] = m
        out[f"reward/{k}/std"] = math.sqrt(max(b / n - m * m, 0.0)) if n else math.nan
        out[f"reward/{k}/not_applicable_or_error"] = s[3] - n
    return out


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------------------------------ the loop

class Preempted(Exception):
    """Raised after a signal-triggered checkpoint; the CLI turns it into PREEMPTED_EXIT (slurm requeues)."""


PREEMPTED_EXIT = 85


class StopFlag:
    """SIGTERM / SIGUSR1 (slurm's warning, Ctrl-C's cousin) only set a flag; the ranks agree on it at a step
    boundary, then checkpoint and stop together. A second signal, or one during a save, changes nothing more."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this step, then checkpoint and exit", signal.Signals(signum).name)
        self.signum = signum

    def agreed(self) -> bool:
        return coll.any_rank(self.signum is not None)


def log_step(cfg: Config, st: dict[str, Any], step: int, groups: list[Group], rounds: int, upd: dict[str, float],
             timer: Timer, t0: float, run_dir: Path) -> dict[str, Any]:
    """The step's metrics record (reduced over ranks) and its rollout records (written by rank 0)."""
    rec = {"step": step, **step_metrics(groups, st["world"], rounds), **upd}
    names = list(st["reward_errors"])
    counts = coll.all_sum([st["reward_errors"][k] for k in names] + [st["reward_timeouts"][k] for k in names])
    for i, k in enumerate(names):
        rec[f"reward/{k}/errors"], rec[f"reward/{k}/timeouts"] = counts[i], counts[len(names) + i]
    n_samples = len(groups) * cfg.rollout.num_generations * st["world"]
    if rec["reward/errors"] > cfg.scoring.max_error_frac * n_samples and st["rank"] == 0:
        log.error("step %d: %d of %d samples could not be scored (errors/timeouts, see reward/*/errors): they "
                  "are skipped, not zero; check the reward functions", step, rec["reward/errors"], n_samples)
    gen_tokens = coll.all_sum([sum(len(c.ids) for g in groups for c in g.completions)])[0]
    step_time = time.perf_counter() - t0
    rec.update({f"time/{k}": v for k, v in timer.t.items()})
    rec.update({"time/step": step_time, "tokens_per_second": gen_tokens / step_time,
                "memory/peak_gib": peak_memory_gib(st["device"])})
    gathered = coll.gather_objects(rollout_records(step, groups, step - 1) if cfg.log.rollouts else [])
    if st["rank"] == 0 and cfg.log.rollouts:
        write_records(run_dir / "rollouts" / f"step-{step:06d}.parquet", [r for p in gathered for r in p])
    return rec


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last metrics line, for the model card; {} when there is none or it was cut off (rank 0 reads it, and a
    failure here must not keep it from the collective export that follows)."""
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}


def run_step(cfg: Config, st: dict[str, Any], sampler: PromptSampler, step: int, run_dir: Path) -> dict[str, Any]:
    """One GRPO step, from sampling to the checked weight sync; returns its metrics record."""
    timer, t0 = Timer(), time.perf_counter()
    st["reward_errors"], st["reward_timeouts"] = {}, {}
    st["step"] = step
    groups, rounds = collect(cfg, st, sampler, timer)  # generate + score + advantages
    st["rollout"].release()  # a colocated vLLM engine frees its GPU memory for the update
    upd = update(cfg, st, groups, timer)  # logprobs + loss + backward + step
    with timer("sync"):
        upd.update(st["rollout"].sync(st["engine"].module))  # new weights to the engine, checked
    return log_step(cfg, st, step, groups, rounds, upd, timer, t0, run_dir)


def checkpoint_meta(cfg: Config, st: dict[str, Any], sampler: PromptSampler, step: int,
                    wandb_id: str | None) -> dict[str, Any]:
    """What a resume needs besides DeepSpeed's own state: the step, the data order, and the config to match."""
    return {"step": step, "sampler": sampler.state(), "world_size": st["world"], "wandb_id": wandb_id,
            "config": to_dict(cfg)}


def train(cfg: Config) -> Path:
    st = setup(cfg)
    rank, engine = st["rank"], st["engine"]
    stop = StopFlag()
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    coll.barrier()
    sampler = PromptSampler(len(st["prompts"].rows), cfg.seed)
    ckpt_root = run_dir / "checkpoints"
    start, wandb_id = 0, None
    resumed = ckpt.load_latest(engine, ckpt_root, cfg.checkpoint.resume, rank, st["world"], to_dict(cfg))
    if resumed is not None:
        path, meta = resumed
        start, wandb_id = meta["step"], meta.get("wandb_id")
        sampler.load_state(meta["sampler"])
        log.info("resumed from %s at step %d", path, start)
    metrics = Metrics(run_dir, to_dict(cfg), cfg.log.wandb, cfg.log.wandb_project, wandb_id) if rank == 0 else None
    if metrics is not None:
        metrics.truncate_after(start)  # lines written after the checkpoint we resume from are redone
    if cfg.rollout.engine != "hf":  # the engine loaded model.path: check the pipeline, and catch up on a resume
        first = st["rollout"].sync(engine.module)
        log.info("initial weight sync: %s", first)

    if start == 0 and cfg.eval.at_start:
        ev = evaluate(cfg, st, 0, run_dir)
        if metrics is not None and ev:
            metrics.log({"step": 0, **ev})
            log.info("eval at step 0: %s", ev)

    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="grpo", dynamic_ncols=True)
    try:
        for step in range(start + 1, cfg.steps + 1):
            rec = run_step(cfg, st, sampler, step, run_dir)
            if (cfg.eval.every and step % cfg.eval.every == 0) or (step == cfg.steps and cfg.eval.at_end):
                rec.update(evaluate(cfg, st, step, run_dir))
            if metrics is not None:
                metrics.log(rec)
                bar.set_postfix(reward=f"{rec['reward/mean']:.3f}",
                                **({"eval_acc": f"{rec['eval/accuracy']:.3f}"} if "eval/accuracy" in rec else {}))
                bar.update(1)
            stopping = stop.agreed()
            if stopping or step == cfg.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                meta = checkpoint_meta(cfg, st, sampler, step, metrics.wandb_id if metrics else None)
                ckpt.save(engine, ckpt_root, step, meta, rank, cfg.checkpoint.keep)
            if stopping and step < cfg.steps:
                marker = os.environ.get("GRPO_PREEMPT_MARKER")  # launchers (torchrun) hide our exit code
                if marker and rank == 0:
                    Path(marker).write_text(f"{step}\n")
                raise Preempted(f"stopped by signal after step {step}; checkpoint written, resume with the same "
                                "command")
        if cfg.checkpoint.save_final_model:
            save_final(engine, st["tok"], run_dir / "final", to_dict(cfg), last_metrics(run_dir) if rank == 0 else {})
            if cfg.log.push_to_hub and rank == 0:
                log.info("pushed the final model: %s", push_to_hub(run_dir / "final", cfg.log.push_to_hub))
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if st["pool"] is not None:
            st["pool"].close()
    return run_dir


def evaluate_only(cfg: Config) -> dict[str, float]:
    """`grpo eval`: the held-out evaluation of `model.path` alone (records and one metrics line in output_dir)."""
    st = setup(cfg)
    run_dir = Path(cfg.output_dir)
    if st["rank"] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    coll.barrier()
    try:
        ev = evaluate(cfg, st, 0, run_dir)
        if st["rank"] == 0:
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "model": cfg.model.path, **ev}) + "\n")
    finally:
        if st["pool"] is not None:
            st["pool"].close()
    return ev
