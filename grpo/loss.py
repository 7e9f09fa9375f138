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


def truncated_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_trainer / pi_engine, cap) per token: corrects the sampler/trainer mismatch (TIS), no gradient."""
    return torch.clamp(torch.exp(trainer_logp.detach() - engine_logp), max=cap)


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
class LossParts:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step loss
    pg_loss: float
    kl: float  # weighted by the same token weights
    clip_frac_num: float  # number of clipped tokens (sum; divide by token count for a fraction)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor,
                clip_low: float, clip_high: float, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
                is_weights: torch.Tensor | None = None) -> LossParts:
    """sum_t w_t * [is_t * clipped_surrogate_t + beta * k3_t] over the micro-batch's completion tokens."""
    pg, was_clipped = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    if is_weights is not None:
        pg = pg * is_weights
    total = pg
    kl_val = 0.0
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference logprobs")
        kl = k3_kl(logp, ref_logp)
        total = total + beta * kl
        kl_val = float((kl.detach() * weights).sum())
    loss = (total * weights).sum()
    return LossParts(loss, float((pg.detach() * weights).sum()), kl_val, float(was_clipped.sum()))
