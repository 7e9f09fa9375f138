"""The clipped policy-gradient objective, as plain functions on flat per-token tensors.

Tensors hold one entry per completion token of a micro-batch (no padding). `seq_len[t]` is the length of the
completion token t belongs to. Normalisers that span the whole step (the global token count across ranks and
micro-batches) are passed in as numbers, so the GRPO / DAPO / Dr. GRPO aggregations are each checkable by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(r A, clip(r, 1-lo, 1+hi) A) and a bool mask of tokens where clipping bit.

    With one pass per batch old_logp == logp.detach(): the ratio is exactly 1 and the gradient is A * grad(logp).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).detach()
    return loss, was_clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def truncated_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float,
                         seq_index: torch.Tensor | None = None, num_seqs: int = 0, level: str = "token",
                         mode: str = "truncate") -> torch.Tensor:
    """Importance weights pi_trainer / pi_engine that correct the sampler/trainer mismatch (no gradient).

    level token: one ratio per token; sequence: the product of a sequence's token ratios, given to each of its
    tokens (`seq_index` maps tokens to sequences). mode truncate: min(w, cap) (TIS); mask: w where w <= cap, else 0
    (the sample is dropped rather than down-weighted).
    """
    log_w = trainer_logp.detach().float() - engine_logp.float()
    if level == "sequence":
        if seq_index is None:
            raise ValueError("sequence-level importance weights need seq_index")
        per_seq = torch.zeros(num_seqs, dtype=log_w.dtype, device=log_w.device).index_add_(0, seq_index, log_w)
        log_w = per_seq[seq_index]
    elif level != "token":
        raise ValueError(f"unknown importance weight level {level!r}")
    w = torch.exp(log_w)  # may overflow to inf: both modes below handle it
    if mode == "truncate":
        return torch.clamp(w, max=cap)
    if mode == "mask":
        return torch.where(w <= cap, w, torch.zeros_like(w))
    raise ValueError(f"unknown importance weight mode {mode!r}")


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, seq_index: torch.Tensor,
                       num_seqs: int) -> torch.Tensor:
    """GSPO's ratio, per token: the value is the sequence's length-normalised log-ratio
    mean_t(logp - old) (the same for all its tokens), and the gradient is that of logp_t. So exp() of it is the
    sequence ratio s_i, clipping acts on whole sequences, and d(s_i)/d(theta) flows through every token."""
    diff = (logp - old_logp).detach()
    ones = torch.ones_like(diff)
    n = torch.zeros(num_seqs, dtype=diff.dtype, device=diff.device).index_add_(0, seq_index, ones)
    mean = torch.zeros(num_seqs, dtype=diff.dtype, device=diff.device).index_add_(0, seq_index, diff) / n
    return mean[seq_index] + logp - logp.detach()


def token_weights(mode: str, seq_len: torch.Tensor, global_tokens: int, global_seqs: int,
                  max_len: int) -> torch.Tensor:
    """Per-token weights w such that the step's loss is sum(per_token_loss * w) over all ranks and micro-batches.

    token:    1 / (all completion tokens of the step)               (DAPO token-level mean)
    sequence: 1 / (len(own sequence) * number of sequences)         (GRPO: mean of per-sequence means)
    constant: 1 / (max_len * number of sequences)                   (Dr. GRPO: a constant normaliser)
    """
    if mode == "token":
        return torch.full_like(seq_len, 1.0 / global_tokens, dtype=torch.float32)
    if mode == "sequence":
        return 1.0 / (seq_len.float() * global_seqs)
    if mode == "constant":
        return torch.full_like(seq_len, 1.0 / (max_len * global_seqs), dtype=torch.float32)
    raise ValueError(f"unknown loss aggregation {mode!r}")


@dataclass
class LossInput:
    """One micro-batch's per-token tensors for `policy_loss` (all flat, one entry per completion token)."""

    logp: torch.Tensor  # the trainer's logprobs, with gradient
    old_logp: torch.Tensor  # at the weights that sampled (== logp.detach() on the first pass)
    adv: torch.Tensor  # the sequence's advantage, per token
    weights: torch.Tensor  # token_weights(): the token's share of the step loss (0 for an unscored sequence)
    ref_logp: torch.Tensor | None = None  # the frozen reference's, when beta > 0
    is_weights: torch.Tensor | None = None  # truncated importance weights (engine/trainer mismatch)
    seq_index: torch.Tensor | None = None  # token -> sequence in the micro-batch (the sequence-level ratio)
    num_seqs: int = 0


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step loss
    pg_loss: float
    kl: float  # weighted by the same token weights
    clip_frac_num: float  # number of clipped tokens (sum; divide by token count for a fraction)


def policy_loss(x: LossInput, clip_low: float, clip_high: float, beta: float = 0.0,
                ratio: str = "token") -> LossParts:
    """sum_t w_t * [is_t * clipped_surrogate_t + beta * k3_t] over the micro-batch's completion tokens.

    ratio token: the PPO ratio per token; sequence: GSPO's length-normalised sequence ratio (needs seq_index)."""
    if ratio == "sequence":
        if x.seq_index is None:
            raise ValueError("the sequence-level ratio needs seq_index")
        log_r = sequence_log_ratio(x.logp, x.old_logp, x.seq_index, x.num_seqs)
        pg, was_clipped = clipped_surrogate(log_r, torch.zeros_like(log_r), x.adv, clip_low, clip_high)
    elif ratio == "token":
        pg, was_clipped = clipped_surrogate(x.logp, x.old_logp, x.adv, clip_low, clip_high)
    else:
        raise ValueError(f"unknown ratio level {ratio!r}")
    if x.is_weights is not None:
        pg = pg * x.is_weights
    total = pg
    kl_val = 0.0
    if beta > 0:
        if x.ref_logp is None:
            raise ValueError("beta > 0 needs reference logprobs")
        kl = k3_kl(x.logp, x.ref_logp)
        total = total + beta * kl
        kl_val = float((kl.detach() * x.weights).sum())
    loss = (total * x.weights).sum()
    return LossParts(loss, float((pg.detach() * x.weights).sum()), kl_val, float(was_clipped.sum()))
