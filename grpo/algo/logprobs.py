"""Per-token logprobs of completions under the policy, without full-vocabulary fp32 logits for a whole batch.

The transformer body runs once per micro-batch; only the hidden states of positions that predict a completion
token are kept ([T, H], prompt positions dropped), and the vocabulary projection + log-softmax runs over those in
chunks of `chunk_size` tokens inside one autograd function that recomputes each chunk's logits in its backward, so
at most one chunk's [chunk, V] fp32 logits is alive at a time, and the head is entered once per micro-batch.

Three layouts of the micro-batch, all giving the same numbers:
- `prefix` (default): a GRPO group shares its prompt, so each distinct prompt runs through the body once, in one
  flat stream with its completions and no padding; `grpo.algo.prefix_attention` gives each completion its prompt's keys
  (differentiably: the prompt positions get their gradient summed over the group). Tokens per step drop from
  P*G*(Lp+Lc) to P*Lp + P*G*Lc, with or without gradient checkpointing.
- `padded`: sequences sorted by length upstream, right-padded to the longest of the micro-batch.
- `packed`: one row, position ids restarting per sequence, no padding at all (for flash-attention kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo.algo import prefix_attention
from grpo.algo.prefix_attention import PrefixLayout


@dataclass
class Sequence:
    prompt_ids: list[int]
    completion_ids: list[int]
    # 1 where the policy sampled the token, 0 where it was appended (a tool's output): None is all 1. A masked token
    # is context for the tokens after it but is never predicted, so it is out of every loss term and every count.
    mask: list[int] | None = None


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] padded, or [1, sum of lengths] packed
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    rows: torch.Tensor  # [T] row of the position predicting each completion token
    cols: torch.Tensor  # [T] column of that position (one before the token)
    targets: torch.Tensor  # [T] completion token ids (the sampled ones: masked tokens are not predicted)
    seq_index: torch.Tensor  # [T] which sequence of the micro-batch each token belongs to
    seq_len: torch.Tensor  # [T] completion length of that sequence, in sampled tokens
    prefix: PrefixLayout | None = None  # the `prefix` layout's attention structure


# A prepared 4D mask is passed through by transformers unchanged: it keeps the model from building a [T, T] mask
# for the flat prefix stream, whose attention `grpo.algo.prefix_attention` does itself.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def build_micro_batch(seqs: list[Sequence], pad_id: int, layout: str = "prefix",
                      device: torch.device | str = "cpu") -> MicroBatch:
    """The micro-batch of `seqs` in `layout`, with one prediction entry (row, column, target) per completion token
    in order, or per sampled token where a sequence has a mask."""
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    ids, attention_mask, position_ids, rows, cols, prefix = _LAYOUTS[layout](seqs, pad_id, device)
    targets = [t for s in seqs for t in s.completion_ids]
    seq_index = [i for i, s in enumerate(seqs) for _ in s.completion_ids]
    seq_len = [len(s.completion_ids) for s in seqs for _ in s.completion_ids]
    if any(s.mask is not None for s in seqs):
        rows, cols, targets, seq_index, seq_len = _sampled_only(seqs, rows, cols, targets, seq_index)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return MicroBatch(ids.to(device), attention_mask, position_ids, t(rows), t(cols), t(targets), t(seq_index),
                      t(seq_len), prefix)


def _prefix_layout(seqs: list[Sequence], pad_id: int, device):
    """One flat stream: each distinct prompt once, then every completion (prefix attention joins them)."""
    prompts: dict[tuple[int, ...], int] = {}
    owner = [prompts.setdefault(tuple(s.prompt_ids), len(prompts)) for s in seqs]
    flat = [t for p in prompts for t in p] + [t for s in seqs for t in s.completion_ids]
    prefix, position_ids, pred = prefix_attention.build_layout([len(p) for p in prompts], owner,
                                                               [len(s.completion_ids) for s in seqs], device)
    return torch.tensor([flat]), _NO_MASK.to(device), position_ids, [0] * len(pred), pred.tolist(), prefix


def _padded_layout(seqs: list[Sequence], pad_id: int, device):
    """One row per sequence, right-padded to the longest."""
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for i, s in enumerate(seqs):
        full = s.prompt_ids + s.completion_ids
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        p, c = len(s.prompt_ids), len(s.completion_ids)
        rows += [i] * c
        cols += range(p - 1, p + c - 1)
    return ids, mask.to(device), None, rows, cols, None


def _packed_layout(seqs: list[Sequence], pad_id: int, device):
    """One row, sequences one after another, position ids restarting per sequence: no padding at all."""
    flat, pos, rows, cols = [], [], [], []
    for s in seqs:
        full = s.prompt_ids + s.completion_ids
        off = len(flat)
        flat += full
        pos += range(len(full))
        p, c = len(s.prompt_ids), len(s.completion_ids)
        rows += [0] * c
        cols += range(off + p - 1, off + p + c - 1)
    return torch.tensor([flat]), None, torch.tensor([pos], device=device), rows, cols, None


_LAYOUTS = {"prefix": _prefix_layout, "padded": _padded_layout, "packed": _packed_layout}


def _sampled_only(seqs: list[Sequence], rows: list[int], cols: list[int], targets: list[int], seq_index: list[int]
                  ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """The prediction entries of the sampled tokens only (every layout lists one entry per completion token, in
    order), and each sequence's length counted in sampled tokens: what the loss normalises by."""
    keep = [m for s in seqs for m in (s.mask if s.mask is not None else [1] * len(s.completion_ids))]
    if len(keep) != len(targets):
        raise ValueError(f"masks cover {len(keep)} tokens, the completions hold {len(targets)}")
    idx = [j for j, m in enumerate(keep) if m]
    n = [0] * len(seqs)
    for j in idx:
        n[seq_index[j]] += 1
    return ([rows[j] for j in idx], [cols[j] for j in idx], [targets[j] for j in idx], [seq_index[j] for j in idx],
            [n[seq_index[j]] for j in idx])


class _HeadLogprobs(torch.autograd.Function):
    """Logprobs of `targets` under softmax((h W^T + b) / temperature), projected `chunk` rows at a time in the
    forward and again in the backward, so at most one chunk's [chunk, V] fp32 logits is alive at a time.

    Why one function rather than the head module called per chunk under checkpointing: ZeRO-3 gathers the head's
    weight at every call of the module and again at every recomputation, so a rank with more completion tokens
    issued more gathers than its peers (a hang or a crash), and the weight (1 GB at 7B) was gathered per chunk.
    Here the module is entered once per micro-batch: one gather in the forward, one in the backward, on every rank.
    The entropies (detached) are appended to `entropy_out`, not returned: an output DeepSpeed wraps for its backward
    hooks must be one that takes part in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                inv_temp: float, chunk: int, entropy_out: list[torch.Tensor]) -> torch.Tensor:
        logp = hidden.new_empty(targets.shape, dtype=torch.float32)
        logz = torch.empty_like(logp)
        ent = torch.empty_like(logp)
        for lo in range(0, targets.numel(), chunk):
            hi = min(lo + chunk, targets.numel())
            logits = _logits(hidden[lo:hi], weight, bias, inv_temp)
            logz[lo:hi] = torch.logsumexp(logits, dim=-1)
            logp[lo:hi] = logits.gather(-1, targets[lo:hi, None]).squeeze(-1) - logz[lo:hi]
            probs = torch.exp(logits - logz[lo:hi, None])
            ent[lo:hi] = logz[lo:hi] - torch.linalg.vecdot(probs, logits)
        entropy_out.append(ent)
        ctx.save_for_backward(hidden, weight, bias, targets, logz)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        return logp

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, bias, targets, logz = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for lo in range(0, targets.numel(), ctx.chunk):
            hi = min(lo + ctx.chunk, targets.numel())
            # d logp_i / d logits_ij = (1[j = target_i] - p_ij) / temperature, built in place in one buffer
            d = _logits(hidden[lo:hi], weight, bias, ctx.inv_temp).sub_(logz[lo:hi, None]).exp_()
            g = grad[lo:hi].float()
            d.mul_(-g[:, None])
            d[torch.arange(hi - lo, device=d.device), targets[lo:hi]] += g
            d = d.mul_(ctx.inv_temp).to(weight.dtype)
            if need_h:
                grad_h[lo:hi] = d @ weight
            if need_w:
                grad_w.addmm_(d.t(), hidden[lo:hi])
            if need_b:
                grad_b += d.sum(0)
        return grad_h, grad_w, grad_b, None, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()  # [chunk, V] in fp32: the only full-vocabulary tensor of the chunk
    return logits.mul_(inv_temp) if inv_temp != 1.0 else logits


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs [T] and detached entropies [T] of `targets` after the output projection `head` of `hidden` [T, H].

    The head module is called exactly once (with its forward swapped for the chunked function for that call), so
    module hooks run once: DeepSpeed ZeRO-3 gathers the weight once for the forward and once for the backward."""
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the model's output embeddings are a {type(head).__name__}, not a torch.nn.Linear: the "
                        "chunked vocabulary projection does not know how to apply it")
    entropy: list[torch.Tensor] = []

    def forward(h: torch.Tensor) -> torch.Tensor:
        return _HeadLogprobs.apply(h, head.weight, head.bias, targets, 1.0 / temperature, chunk_size, entropy)

    own = head.__dict__.get("forward")
    head.forward = forward
    try:
        logp = head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return logp, entropy[0]


def completion_logprobs(model: torch.nn.Module, mb: MicroBatch, temperature: float = 1.0,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs [T] (differentiable when grad is enabled) and entropies [T] (detached) of the completion tokens,
    under softmax(logits / temperature): the distribution the rollout engine sampled from."""
    body = getattr(model, model.base_model_prefix)
    extra = {}
    if mb.prefix is not None:
        prefix_attention.enable(model)
        extra["prefix_layout"] = mb.prefix
        calls = mb.prefix.calls
    out = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
               use_cache=False, **extra)
    if mb.prefix is not None and mb.prefix.calls == calls:  # the flat stream went through plain causal attention
        raise RuntimeError(f"{type(model).__name__}'s attention does not go through transformers' attention "
                           "functions, so optim.layout=prefix cannot shape it; set optim.layout=padded")
    hidden = out.last_hidden_state[mb.rows, mb.cols]  # [T, H]
    return head_logprobs(model.get_output_embeddings(), hidden, mb.targets, temperature, chunk_size)


def reference_logprobs(model: torch.nn.Module, seqs: list[Sequence], temperature: float = 1.0) -> list[torch.Tensor]:
    """The plain computation, one sequence at a time with full logits: the independent route tests compare to."""
    out = []
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(input_ids=ids).logits[0].float() / temperature
        p = len(s.prompt_ids)
        lp = F.log_softmax(logits[p - 1 : -1], dim=-1)
        out.append(lp.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1))
    return out
