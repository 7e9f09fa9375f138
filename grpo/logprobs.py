"""Per-token logprobs of completions under the policy, without full-vocabulary fp32 logits for a whole batch.

The transformer body runs once per micro-batch; only the hidden states of positions that predict a completion
token are kept ([T, H], prompt positions dropped), and the vocabulary projection + log-softmax runs over those in
chunks of `chunk_size` tokens. Under autograd each chunk is checkpointed, so at most one chunk's [chunk, V] fp32
logits is alive at a time, in the forward and in the backward.

Three layouts of the micro-batch, all giving the same numbers:
- `prefix` (default): a GRPO group shares its prompt, so each distinct prompt runs through the body once, in one
  flat stream with its completions and no padding; `grpo.prefix_attention` gives each completion its prompt's keys
  (differentiably: the prompt positions get their gradient summed over the group). Tokens per step drop from
  P*G*(Lp+Lc) to P*Lp + P*G*Lc, with or without gradient checkpointing.
- `padded`: sequences sorted by length upstream, right-padded to the longest of the micro-batch.
- `packed`: one row, position ids restarting per sequence, no padding at all (for flash-attention kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from grpo import prefix_attention
from grpo.prefix_attention import PrefixLayout


@dataclass
class Sequence:
    prompt_ids: list[int]
    completion_ids: list[int]


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
    prefix: PrefixLayout | None = None  # the `prefix` layout's attention structure


# A prepared 4D mask is passed through by transformers unchanged: it keeps the model from building a [T, T] mask
# for the flat prefix stream, whose attention `grpo.prefix_attention` does itself.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def build_micro_batch(seqs: list[Sequence], pad_id: int, layout: str = "prefix",
                      device: torch.device | str = "cpu") -> MicroBatch:
    rows, cols, targets, seq_index, seq_len = [], [], [], [], []
    prefix = None
    if layout == "prefix":
        prompts: dict[tuple[int, ...], int] = {}
        owner = [prompts.setdefault(tuple(s.prompt_ids), len(prompts)) for s in seqs]
        flat = [t for p in prompts for t in p]
        for i, s in enumerate(seqs):
            c = len(s.completion_ids)
            flat += s.completion_ids
            targets += s.completion_ids
            seq_index += [i] * c
            seq_len += [c] * c
        prefix, position_ids, pred = prefix_attention.build_layout([len(p) for p in prompts], owner,
                                                                   [len(s.completion_ids) for s in seqs], device)
        rows, cols = [0] * len(pred), pred.tolist()
        ids = torch.tensor([flat])
        attention_mask = _NO_MASK.to(device)
    elif layout == "padded":
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
                      t(seq_len), prefix)


def _head_chunk(head: torch.nn.Module, h: torch.Tensor, tgt: torch.Tensor, inv_temp: float,
                entropy: list[torch.Tensor]) -> torch.Tensor:
    """Logprobs of `tgt` for one chunk; appends the chunk's (detached) entropies to `entropy` on the first call only.
    Under checkpointing this function runs again in backward with the same arguments: the entropy (a softmax over
    the whole vocabulary, without gradient) is not recomputed there."""
    first = not entropy
    logits = head(h).float()  # [chunk, V] in fp32: the only full-vocabulary tensors alive are this chunk's
    if inv_temp != 1.0:
        logits = logits * inv_temp
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tgt[:, None]).squeeze(-1) - logz
    if first:
        with torch.no_grad():
            probs = torch.exp(logits.detach() - logz.detach()[:, None])
            entropy.append(logz.detach() - torch.linalg.vecdot(probs, logits.detach()))
    return logp


def completion_logprobs(model: torch.nn.Module, mb: MicroBatch, temperature: float = 1.0,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs [T] (differentiable when grad is enabled) and entropies [T] (detached) of the completion tokens,
    under softmax(logits / temperature): the distribution the rollout engine sampled from."""
    body = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    extra = {}
    if mb.prefix is not None:
        if not prefix_attention.supports(model):
            raise ValueError(f"optim.layout=prefix needs model.attn_implementation sdpa or flash_attention_2, not "
                             f"{model.config._attn_implementation!r}; or set optim.layout=padded")
        prefix_attention.install()
        extra["prefix_layout"] = mb.prefix
        calls = mb.prefix.calls
    out = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
               use_cache=False, **extra)
    if mb.prefix is not None and mb.prefix.calls == calls:  # the flat stream went through plain causal attention
        raise RuntimeError(f"{type(model).__name__}'s attention does not go through transformers' attention "
                           "functions, so optim.layout=prefix cannot shape it; set optim.layout=padded")
    hidden = out.last_hidden_state[mb.rows, mb.cols]  # [T, H]
    inv_temp = 1.0 / temperature
    logps, ents = [], []
    for h, tgt in zip(hidden.split(chunk_size), mb.targets.split(chunk_size), strict=False):
        ent: list[torch.Tensor] = []
        if torch.is_grad_enabled():
            logps.append(checkpoint(_head_chunk, head, h, tgt, inv_temp, ent, use_reentrant=False))
        else:
            logps.append(_head_chunk(head, h, tgt, inv_temp, ent))
        ents += ent
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
