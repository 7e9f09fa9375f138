"""The policy update on one rank's groups: micro-batches, fixed logprobs, one step per micro-batch.

    build_batch -> fixed_logprobs (old / reference, only when needed) -> micro_step x grad_accum -> reduce stats

Every rank's loss is its share of the step's global sum (the normalisers count tokens and sequences over all
ranks), so DeepSpeed's gradient average over ranks is undone by multiplying by the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.algo.logprobs import MicroBatch, Sequence, build_micro_batch, completion_logprobs
from grpo.algo.loss import LossInput, policy_loss, token_weights, truncated_is_weights
from grpo.config import BatchShape, Config
from grpo.rollout.scoring import Group
from grpo.runtime import collectives as coll
from grpo.runtime.deepspeed_setup import forward_in_engine, recorded_grad_norm, stage0_grad_norm


@dataclass
class Learner:
    """What the update needs: the DeepSpeed engine of the policy, the frozen reference (beta > 0), the shape."""

    policy: Any  # the policy's deepspeed.DeepSpeedEngine
    ref: torch.nn.Module | None
    shape: BatchShape
    pad_id: int


@dataclass
class Batch:
    """This rank's sequences for the step, cut into `grad_accum` micro-batches (None: nothing left to train on)."""

    seqs: list[Sequence]
    adv: list[float]
    rollout_lp: list[list[float]]
    valid: list[bool]  # False: a reward errored (NaN total); the sequence is masked out of the loss
    where: list[tuple[int, int]]  # (group, completion) each sequence came from
    chunks: list[list[int]]  # indices into seqs, one list per micro-batch
    micro: list[MicroBatch | None]
    global_tokens: float  # over all ranks: the loss normalisers
    global_seqs: float


@dataclass
class Stats:
    """Sums over micro-batches (first pass unless noted), reduced over ranks by name."""

    pg_loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0  # every pass: with one pass the ratio is 1
    clip_tokens: float = 0.0
    entropy_sum: float = 0.0
    mismatch_sum: float = 0.0
    tokens: float = 0.0
    tis_cut: float = 0.0
    mismatch_max: float = 0.0  # reduced by max

    def add(self, other: Stats) -> None:
        for k, v in vars(other).items():
            setattr(self, k, max(getattr(self, k), v) if k == "mismatch_max" else getattr(self, k) + v)


@dataclass
class MicroResult:
    stats: Stats
    logprob_sums: torch.Tensor | None = None  # first pass: the trainer's summed logprob per sequence
    grad_norm: float | None = None  # stage 0, last micro-batch: the pre-clip norm (DeepSpeed records none)


@dataclass
class Update:
    metrics: dict[str, float]
    trainer_logprob_mean: list[list[float]] = field(default_factory=list)  # per group, per completion (NaN: empty)


def build_batch(cfg: Config, learner: Learner, groups: list[Group]) -> Batch:
    """Sequences with their advantages, in the layout's order. The gradient does not depend on the order: `prefix`
    keeps groups together (one prompt forward per group); the others sort by length so micro-batches pad little."""
    seqs, adv, rollout_lp, valid, where = [], [], [], [], []
    for gi, g in enumerate(groups):
        for ci, (c, a, tot) in enumerate(zip(g.completions, g.advantages, g.total, strict=True)):
            if not c.sampled():  # a completion without a sampled token has nothing to learn from
                continue
            seqs.append(Sequence(c.prompt_ids, c.ids, c.mask))
            adv.append(a)
            rollout_lp.append(c.sampled_logprobs())
            valid.append(not math.isnan(tot))
            where.append((gi, ci))
    n_tok = sum(groups[gi].completions[ci].sampled() for (gi, ci), v in zip(where, valid, strict=True) if v)
    counts = coll.sum_named({"tokens": n_tok, "seqs": sum(valid)})
    layout = cfg.layout()
    order = list(range(len(seqs)))
    if layout != "prefix":
        order.sort(key=lambda i: len(seqs[i].prompt_ids) + len(seqs[i].completion_ids))
    mbs = cfg.optim.micro_batch_size
    chunks = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    chunks += [[] for _ in range(learner.shape.grad_accum - len(chunks))]  # empty completions were skipped
    device = learner.policy.device
    micro = [build_micro_batch([seqs[i] for i in ch], learner.pad_id, layout, device) if ch else None
             for ch in chunks]
    return Batch(seqs, adv, rollout_lp, valid, where, chunks, micro, max(counts["tokens"], 1.0),
                 max(counts["seqs"], 1.0))


def fixed_logprobs(cfg: Config, learner: Learner, batch: Batch) -> tuple[list, list]:
    """Per micro-batch: the logprobs at the sampling weights (only with several passes; with one pass they equal
    the trainer's own, detached) and the reference model's (only with beta > 0). None where not needed."""
    n = len(batch.micro)
    old: list[torch.Tensor | None] = [None] * n
    ref: list[torch.Tensor | None] = [None] * n
    temp, chunk = cfg.rollout.temperature, cfg.optim.logprob_chunk_size
    with torch.no_grad():
        for k, mb in enumerate(batch.micro):
            if mb is None:
                continue
            if cfg.algo.num_iterations > 1:
                old[k] = forward_in_engine(learner.policy,
                                           lambda m, mb=mb: completion_logprobs(m, mb, temp, chunk)[0])
            if learner.ref is not None:
                ref[k] = completion_logprobs(learner.ref, mb, temp, chunk)[0]
    return old, ref


def micro_step(cfg: Config, learner: Learner, batch: Batch, k: int, old: torch.Tensor | None,
               ref: torch.Tensor | None, first_pass: bool) -> MicroResult:
    """Forward, loss, backward and `engine.step()` on micro-batch k."""
    engine, mb, ch = learner.policy, batch.micro[k], batch.chunks[k]
    if mb is None:  # every rank takes part in every collective of the step, with a zero loss
        engine.backward(sum(p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
                        scale_wrt_gas=False)
        engine.step()
        return MicroResult(Stats())
    algo, device = cfg.algo, engine.device
    ents: list[torch.Tensor] = []

    def logprobs(m):
        lp, ent = completion_logprobs(m, mb, cfg.rollout.temperature, cfg.optim.logprob_chunk_size)
        ents.append(ent)
        return lp

    logp = forward_in_engine(engine, logprobs)
    seq_adv = torch.tensor([batch.adv[i] for i in ch], dtype=torch.float32, device=device)
    seq_ok = torch.tensor([batch.valid[i] for i in ch], dtype=torch.float32, device=device)
    w = token_weights(algo.loss_agg, mb.seq_len, batch.global_tokens, batch.global_seqs,
                      cfg.rollout.max_new_tokens) * seq_ok[mb.seq_index]
    old = old if old is not None else logp.detach()
    r_lp = torch.tensor([x for i in ch for x in batch.rollout_lp[i]], dtype=torch.float32, device=device)
    st = Stats()
    isw = None
    if cfg.tis_enabled():
        isw = truncated_is_weights(old, r_lp, algo.tis_cap, mb.seq_index, len(ch), algo.tis_level, algo.tis_mode)
        if first_pass:
            raw = truncated_is_weights(old, r_lp, math.inf, mb.seq_index, len(ch), algo.tis_level)
            st.tis_cut = float((raw > algo.tis_cap).sum())
    parts = policy_loss(LossInput(logp, old, seq_adv[mb.seq_index], w, ref, isw, mb.seq_index, len(ch)),
                        algo.clip_low, algo.clip_high, algo.beta, algo.ratio)
    engine.backward(parts.loss * learner.shape.world_size, scale_wrt_gas=False)
    norm = None
    if k == len(batch.micro) - 1 and engine.zero_optimization_stage() == 0:
        norm = stage0_grad_norm(engine)  # read before step() clears the gradients
    engine.step()
    st.clipped, st.clip_tokens = parts.clip_frac_num, len(logp)
    if not first_pass:
        return MicroResult(st, None, norm)
    diff = (logp.detach() - r_lp).abs()
    st.pg_loss, st.kl, st.entropy_sum = parts.pg_loss, parts.kl, float(ents[0].sum())
    st.mismatch_sum, st.tokens = float(diff.sum()), len(logp)
    st.mismatch_max = float(diff.max()) if len(diff) else 0.0
    per_seq = torch.zeros(len(ch), device=device).index_add_(0, mb.seq_index, logp.detach().float())
    return MicroResult(st, per_seq, norm)


def update(cfg: Config, learner: Learner, groups: list[Group], timer) -> Update:
    """Logprobs, loss, backward and optimizer step(s) on this rank's groups; the step's update metrics (reduced
    over ranks) and the trainer's mean logprob of each completion (where trainer and engine disagree)."""
    batch = build_batch(cfg, learner, groups)
    if cfg.algo.num_iterations > 1 or learner.ref is not None:
        with timer("logprobs"):
            old, ref = fixed_logprobs(cfg, learner, batch)
    else:
        old = ref = [None] * len(batch.micro)
    means = [[math.nan] * len(g.completions) for g in groups]
    total, grad_norm = Stats(), math.nan
    learner.policy.module.train()
    for it in range(cfg.algo.num_iterations):
        norm = None
        with timer("update"):
            for k in range(len(batch.micro)):
                res = micro_step(cfg, learner, batch, k, old[k], ref[k], it == 0)
                total.add(res.stats)
                norm = res.grad_norm if res.grad_norm is not None else norm
                for j, i in enumerate(batch.chunks[k] if res.logprob_sums is not None else []):
                    gi, ci = batch.where[i]
                    means[gi][ci] = float(res.logprob_sums[j]) / groups[gi].completions[ci].sampled()
        grad_norm = norm if norm is not None else recorded_grad_norm(learner.policy)
    stats = vars(total)
    mismatch_max = coll.max_named({"mismatch_max": stats.pop("mismatch_max")})["mismatch_max"]
    s = coll.sum_named(stats)
    toks = max(s["tokens"], 1.0)
    return Update({"loss/pg": s["pg_loss"], "loss/kl": s["kl"], "clip_frac": s["clipped"] / max(s["clip_tokens"], 1.0),
                   "entropy": s["entropy_sum"] / toks, "logprob_mismatch/mean_abs": s["mismatch_sum"] / toks,
                   "logprob_mismatch/max_abs": mismatch_max, "logprob_mismatch/tis_cut_frac": s["tis_cut"] / toks,
                   "grad_norm": grad_norm, "lr": learner.policy.get_lr()[0]}, means)
