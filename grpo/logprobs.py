"""Per-token logprobs of completions under the policy, without full-vocabulary fp32 logits for a whole batch.

The transformer body runs once per micro-batch; only the hidden states of positions that predict a completion
token are kept ([T, H], prompt positions dropped), and the vocabulary projection + log-softmax runs over those in
chunks of `chunk_size` tokens. Under autograd each chunk is checkpointed, so at most one chunk's [chunk, V] fp32
logits is alive at a time, in the forward and in the backward.

Three layouts of the micro-batch, all giving the same numbers:
- `prefix` (default): a GRPO group shares its prompt, so each distinct prompt runs through the body once and its
  KV cache is fanned out to the group's completions (differentiably: the prompt positions still get their
  gradient, summed over the group). Training tokens per step drop from P*G*(Lp+Lc) to P*Lp + P*G*Lc.
- `padded`: sequences sorted by length upstream, right-padded to the longest of the micro-batch.
- `packed`: one row, position ids restarting per sequence, no padding at all (for flash-attention kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class Sequence:
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class PrefixBatch:
    prompt_ids: torch.Tensor  # [U, Lp] distinct prompts, left-padded (all end at column Lp-1)
    prompt_mask: torch.Tensor
    prompt_pos: torch.Tensor
    owner: torch.Tensor  # [N] which distinct prompt each sequence continues
    comp_ids: torch.Tensor  # [N, Lc] completions, right-padded
    full_mask: torch.Tensor  # [N, Lp + Lc]
    comp_pos: torch.Tensor  # [N, Lc]
    gather: torch.Tensor  # [T] row in cat(prompt last hidden [U], completion hidden [N*Lc]) predicting token t
    targets: torch.Tensor
    seq_index: torch.Tensor
    seq_len: torch.Tensor


def build_prefix_batch(seqs: list[Sequence], pad_id: int, device: torch.device | str = "cpu") -> PrefixBatch:
    prompts: dict[tuple[int, ...], int] = {}
    owner = [prompts.setdefault(tuple(s.prompt_ids), len(prompts)) for s in seqs]
    uniq = list(prompts)
    lp = max(len(p) for p in uniq)
    lc = max(len(s.completion_ids) for s in seqs)
    p_ids = torch.full((len(uniq), lp), pad_id, dtype=torch.long)
    p_mask = torch.zeros((len(uniq), lp), dtype=torch.long)
    for u, p in enumerate(uniq):
        p_ids[u, lp - len(p) :] = torch.tensor(p)
        p_mask[u, lp - len(p) :] = 1
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    c_ids = torch.full((len(seqs), lc), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(seqs), lc), dtype=torch.long)
    gather, targets, seq_index, seq_len = [], [], [], []
    n_u = len(uniq)
    for i, s in enumerate(seqs):
        c = len(s.completion_ids)
        c_ids[i, :c] = torch.tensor(s.completion_ids)
        c_mask[i, :c] = 1
        gather += [owner[i]] + [n_u + i * lc + j for j in range(c - 1)]
        targets += s.completion_ids
        seq_index += [i] * c
        seq_len += [c] * c
    own = torch.tensor(owner, dtype=torch.long)
    plen = p_mask.sum(-1)[own]
    c_pos = plen[:, None] + torch.arange(lc)[None, :]
    full = torch.cat([p_mask[own], c_mask], dim=1)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return PrefixBatch(p_ids.to(device), p_mask.to(device), p_pos.to(device), own.to(device), c_ids.to(device),
                       full.to(device), c_pos.to(device), t(gather), t(targets), t(seq_index), t(seq_len))


def _prefix_hidden(body: torch.nn.Module, pb: PrefixBatch) -> torch.Tensor:
    out_p = body(input_ids=pb.prompt_ids, attention_mask=pb.prompt_mask, position_ids=pb.prompt_pos, use_cache=True)
    cache = out_p.past_key_values
    cache.batch_select_indices(pb.owner)  # fan the prompt KV out to every completion (indexing: differentiable)
    out_c = body(input_ids=pb.comp_ids, attention_mask=pb.full_mask, position_ids=pb.comp_pos,
                 past_key_values=cache, use_cache=True)
    h = out_c.last_hidden_state
    table = torch.cat([out_p.last_hidden_state[:, -1], h.reshape(-1, h.shape[-1])])
    return table[pb.gather]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] padded, or [1, sum of lengths] packed
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    rows: torch.Tensor  # [T] row of the position predicting each completion token
    cols: torch.Tensor  # [T] column of that position (one before the token)
    targets: torch.Tensor  # [T] completion token ids
    seq_index: torch.Tensor  # [T] which sequence of the micro-batch each token belongs to
    seq_len: torch.Tensor  # [T] completion length of that sequence


def build_micro_batch(seqs: list[Sequence], pad_id: int, layout: str = "prefix",
                      device: torch.device | str = "cpu") -> MicroBatch | PrefixBatch:
    if layout == "prefix":
        return build_prefix_batch(seqs, pad_id, device)
    rows, cols, targets, seq_index, seq_len = [], [], [], [], []
    if layout == "padded":
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            full = s.prompt_ids + s.completion_ids
            ids[i, : len(full)] = torch.tensor(full)
            mask[i, : len(full)] = 1
            p, c = len(s.prompt_ids), len(s.completion_ids)
            rows += [i] * c
            cols += range(p - 1, p + c - 1)
            targets += s.completion_ids
            seq_index += [i] * c
            seq_len += [c] * c
        position_ids = None
        attention_mask = mask.to(device)
    elif layout == "packed":
        flat, pos = [], []
        for i, s in enumerate(seqs):
            full = s.prompt_ids + s.completion_ids
            off = len(flat)
            flat += full
            pos += range(len(full))
            p, c = len(s.prompt_ids), len(s.completion_ids)
            rows += [0] * c
            cols += range(off + p - 1, off + p + c - 1)
            targets += s.completion_ids
            seq_index += [i] * c
            seq_len += [c] * c
        ids = torch.tensor([flat])
        position_ids = torch.tensor([pos], device=device)
        attention_mask = None
    else:
        raise ValueError(f"unknown layout {layout!r}")

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return MicroBatch(ids.to(device), attention_mask, position_ids, t(rows), t(cols), t(targets), t(seq_index),
                      t(seq_len))


def _head_chunk(head: torch.nn.Module, h: torch.Tensor, tgt: torch.Tensor,
                inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float() * inv_temp  # [chunk, V] in fp32: the only full-vocabulary tensor alive
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tgt[:, None]).squeeze(-1) - logz
    with torch.no_grad():
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = logz.detach() - (probs * logits.detach()).sum(-1)
    return logp, entropy


def completion_logprobs(model: torch.nn.Module, mb: MicroBatch | PrefixBatch, temperature: float = 1.0,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs [T] (differentiable when grad is enabled) and entropies [T] (detached) of the completion tokens,
    under softmax(logits / temperature): the distribution the rollout engine sampled from."""
    body = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    if isinstance(mb, PrefixBatch):
        hidden = _prefix_hidden(body, mb)
    else:
        out = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                   use_cache=False)
        hidden = out.last_hidden_state[mb.rows, mb.cols]  # [T, H]
    inv_temp = 1.0 / temperature
    logps, ents = [], []
    for h, tgt in zip(hidden.split(chunk_size), mb.targets.split(chunk_size), strict=False):
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_head_chunk, head, h, tgt, inv_temp, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, h, tgt, inv_temp)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)


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
