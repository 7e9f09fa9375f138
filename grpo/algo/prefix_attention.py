"""Shared-prefix attention: each GRPO prompt runs through the transformer once, in the same forward as its group's
completions.

The micro-batch is one flat token stream `[1, T]`: every distinct prompt once, then every completion, no padding.
The linear layers (most of the FLOPs) therefore see each prompt token once instead of once per completion. Only
attention needs to know the structure: prompt u attends causally within itself, and completion n attends to all
of its own prompt and causally within itself.

Why a single forward rather than running the prompt with `use_cache` and fanning its KV cache out: under gradient
checkpointing transformers keeps no cache, and the recomputation in backward has to see the same structure. Here
the structure travels as a keyword argument (`prefix_layout=`), which transformers passes from the model's forward
to every attention call and which its checkpointing keeps for the recomputation. `enable(model)` puts a small
function in front of the model's attention (sdpa under its own name, `grpo_prefix_sdpa`; flash and flex in place,
see `enable`): it takes over only when a forward carries a `PrefixLayout` and hands every other call (generation,
the padded layouts) to the original.

Inside, the flat queries/keys/values are gathered into two padded batches (padding costs attention only, never the
linear layers) and run through torch's scaled_dot_product_attention:
- prompts `[U, h, Lp, d]`, right-padded, `is_causal`: a real query never sees a pad key;
- completions `[N, h, Lc, d]` against keys `[N, h, Lp + Lc, d]` = its prompt's keys then its own, with a mask
  (prompt keys up to the prompt's length, own keys causally). The gather's backward sums each prompt key's gradient
  over the group, which is exactly the gradient of the unshared computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

WRAPPED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
PREFIX = "grpo_prefix_"  # the wrapper of `sdpa` is registered as `grpo_prefix_sdpa`


@dataclass
class PrefixLayout:
    p_idx: torch.Tensor  # [U, Lp] flat position of prompt u's token j (right-padded; pads point at 0)
    c_idx: torch.Tensor  # [N, Lc] flat position of completion n's token i (right-padded)
    kv_idx: torch.Tensor  # [N, Lp + Lc] its prompt's positions, then its own
    c_mask: torch.Tensor  # [N, 1, Lc, Lp + Lc] bool: which of those keys each completion query sees
    out_idx: torch.Tensor  # [T] row of cat(prompt outputs [U*Lp], completion outputs [N*Lc]) for flat token t
    calls: int = field(default=0, compare=False)  # attention calls served: a forward that adds none is an error

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               dropout: float) -> torch.Tensor:
        """query [1, h, T, d], key/value [1, kvh, T, d] (rotary already applied) -> [1, T, h, d]."""
        self.calls += 1
        h, kvh, d = query.shape[1], key.shape[1], query.shape[-1]
        q, k, v = query[0], key[0], value[0]
        # Grouped-query attention: CPU SDPA takes the kv heads as they are (the gathered per-completion copies of
        # the prompt keys stay kvh heads wide); CUDA's memory-efficient kernel, the one that takes a mask, does not,
        # so there they are expanded first.
        gqa = kvh != h and native_gqa(q.device)
        if kvh != h and not gqa:
            k, v = k.repeat_interleave(h // kvh, dim=0), v.repeat_interleave(h // kvh, dim=0)

        def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return x[:, idx].transpose(0, 1)  # [heads, T, d] -> [rows, heads, cols, d]

        out_p = F.scaled_dot_product_attention(rows(q, self.p_idx), rows(k, self.p_idx), rows(v, self.p_idx),
                                               is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        out_c = F.scaled_dot_product_attention(rows(q, self.c_idx), rows(k, self.kv_idx), rows(v, self.kv_idx),
                                               attn_mask=self.c_mask, dropout_p=dropout, scale=scaling,
                                               enable_gqa=gqa)
        flat = torch.cat([out_p.transpose(1, 2).reshape(-1, h, d), out_c.transpose(1, 2).reshape(-1, h, d)])
        return flat[self.out_idx].unsqueeze(0)


def native_gqa(device: torch.device) -> bool:
    return device.type == "cpu"


def build_layout(prompt_lens: list[int], owner: list[int], comp_lens: list[int],
                 device: torch.device | str = "cpu") -> tuple[PrefixLayout, torch.Tensor, torch.Tensor]:
    """The layout of a flat stream holding prompts of `prompt_lens`, then completions of `comp_lens` (completion n
    continues prompt `owner[n]`); the stream's position ids [1, T] (completions continue their prompt's); and, for
    each completion token in order, the stream position that predicts it (its prompt's last token for the first)."""
    lp, lc = max(prompt_lens), max(comp_lens)
    u, n = len(prompt_lens), len(comp_lens)
    p_start = torch.tensor([0] + prompt_lens[:-1]).cumsum(0)
    c_start = sum(prompt_lens) + torch.tensor([0] + comp_lens[:-1]).cumsum(0)
    pl, cl = torch.tensor(prompt_lens), torch.tensor(comp_lens)
    own = torch.tensor(owner, dtype=torch.long)
    jp, jc = torch.arange(lp), torch.arange(lc)
    p_ok, c_ok = jp[None] < pl[:, None], jc[None] < cl[:, None]
    p_idx = torch.where(p_ok, p_start[:, None] + jp[None], 0)
    c_idx = torch.where(c_ok, c_start[:, None] + jc[None], 0)
    kv_idx = torch.cat([p_idx[own], c_idx], dim=1)
    sees_prompt = p_ok[own][:, None, :].expand(n, lc, lp)
    sees_own = (jc[None, :] <= jc[:, None])[None].expand(n, lc, lc)
    c_mask = torch.cat([sees_prompt, sees_own], dim=2)[:, None]
    out_idx = torch.cat([(torch.arange(u)[:, None] * lp + jp[None])[p_ok],
                         u * lp + (torch.arange(n)[:, None] * lc + jc[None])[c_ok]])
    pos = torch.cat([jp[None].expand(u, lp)[p_ok], (pl[own][:, None] + jc[None])[c_ok]])
    pred = torch.where(jc[None] == 0, (p_start + pl - 1)[own][:, None], c_start[:, None] + jc[None] - 1)[c_ok]
    layout = PrefixLayout(p_idx.to(device), c_idx.to(device), kv_idx.to(device), c_mask.to(device),
                          out_idx.to(device))
    return layout, pos[None].to(device), pred


def _wrapper(base: Any):
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
        layout = kwargs.pop("prefix_layout", None)
        if layout is None:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if kwargs.get("sliding_window"):
            raise ValueError("optim.layout=prefix does not support sliding-window attention layers; "
                             "set optim.layout=padded")
        return layout.attend(query, key, value, scaling, dropout if module.training else 0.0), None

    attention.grpo_prefix_base = base
    return attention


def enable(model: torch.nn.Module) -> None:
    """Idempotent: route the model's attention through the prefix-aware wrapper, for the model's lifetime (a
    gradient-checkpointing recomputation must see the same function).

    sdpa: the wrapper is registered under its own name, `grpo_prefix_sdpa` (with sdpa's mask function), and the
    model is switched to it; transformers' `sdpa` entry stays as it is for every other model in the process.
    flash / flex: transformers recognises these by name and their functions read the model's configured name back
    (flash's lazy kernel import does), so a renamed entry cannot hand calls on to them: there the wrapper replaces
    transformers' own entry, in front of the original, which it calls for every forward without a layout."""
    impl = model.config._attn_implementation
    if impl.startswith(PREFIX) or getattr(ALL_ATTENTION_FUNCTIONS.get(impl), "grpo_prefix_base", None) is not None:
        return
    if impl not in WRAPPED:
        raise ValueError(f"optim.layout=prefix needs model.attn_implementation sdpa or flash_attention_2, not "
                         f"{impl!r}; or set optim.layout=padded")
    if impl != "sdpa":
        AttentionInterface.register(impl, _wrapper(ALL_ATTENTION_FUNCTIONS[impl]))
        return
    name = PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _wrapper(ALL_ATTENTION_FUNCTIONS[impl]))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # transformers only warns when a model cannot switch
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation, so "
                         "optim.layout=prefix cannot shape it; set optim.layout=padded")
