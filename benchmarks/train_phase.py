"""The training phase alone (logprobs, loss, backward, optimizer step) on a fixed rollout batch: ours against TRL's
way of computing the same loss, on a model with Qwen2.5-1.5B's shape and random weights. Reports tokens/s, peak
memory and, on a GPU, MFU.

    .venv/bin/python benchmarks/train_phase.py --device cuda --dtype bfloat16            # one H100: the target
    .venv/bin/python benchmarks/train_phase.py --layers 2 --hidden 256 --inter 512 --heads 4 --kv-heads 2 \\
        --prompts 2 --completion 32                                                   # a CPU smoke run

The batch: `--prompts` groups of `--group` completions, each `--prompt-len` prompt tokens + up to `--completion`
tokens. `--lengths varied` (default) draws each completion's length uniformly from [completion/4, completion] with
one per group at the maximum, as a rollout batch with truncations looks; `--lengths fixed` gives every completion
the maximum (no padding anywhere, the case most favourable to TRL).
Ours: `grpo.algo.logprobs.completion_logprobs` (prefix layout: one flat stream per micro-batch, each prompt once, no
padding; chunked checkpointed vocabulary projection) + `grpo.algo.loss.policy_loss`. TRL's (what GRPOTrainer does for
one pass, beta = 0): completions padded to the longest of the rollout batch, the batch through the model with
`logits_to_keep`, logits divided by the temperature, `trl.trainer.utils.selective_log_softmax`, the same clipped
token-level loss under the completion mask. Same micro-batch size, same optimizer (AdamW), gradient checkpointing
on for both by default. Each path runs in its own process so each peak memory is its own.

MFU = the path's model FLOPs (`model_flops`: 6 x parameters per token it runs, plus 12 x layers x hidden per
causal query-key pair; recomputation not counted) / (time x peak FLOP/s);
`--peak-tflops` defaults to an H100's dense bf16 989. Tokens/s counts trained (completion) tokens for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE_1P5B = dict(hidden=1536, inter=8960, layers=28, heads=12, kv_heads=2, vocab=151936)


def build(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=8192, tie_word_embeddings=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    attn = "flash_attention_2" if args.layout == "packed" else "sdpa"
    with torch.device(args.device):
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).to(dtype)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = []
    lengths = iter(completion_lengths(args))
    for _ in range(args.prompts):
        prompt = torch.randint(10, args.vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.group):
            batch.append((prompt, torch.randint(10, args.vocab, (next(lengths),), generator=g).tolist()))
    adv = torch.randn(len(batch), generator=g)
    return model, batch, adv


def completion_lengths(args) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(args.prompts):
        if args.lengths == "fixed":
            out += [args.completion] * args.group
            continue
        lo = max(1, args.completion // 4)
        lens = torch.randint(lo, args.completion + 1, (args.group,), generator=g).tolist()
        lens[0] = args.completion  # one truncated completion per group
        out += lens
    return out


def finish(model, opt) -> float:
    """The optimizer step; returns the gradient norm, so the two paths can be checked to compute the same thing."""
    import torch

    norm = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def step_ours(model, batch, adv, args, opt):
    from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs
    from grpo.algo.loss import LossInput, policy_loss, token_weights

    total = sum(len(c) for _, c in batch)
    for i in range(0, len(batch), args.micro):
        part = batch[i : i + args.micro]
        mb = build_micro_batch([Sequence(p, c) for p, c in part], 0, args.layout, args.device)
        logp, _ = completion_logprobs(model, mb, 1.0, args.chunk)
        a = adv[i : i + args.micro].to(args.device)[mb.seq_index]
        w = token_weights("token", mb.seq_len, total, len(batch), args.completion)
        policy_loss(LossInput(logp, logp.detach(), a, w), 0.2, 0.28).loss.backward()
    return finish(model, opt)


def step_trl(model, batch, adv, args, opt):
    import torch
    from trl.trainer.utils import selective_log_softmax

    total = sum(len(c) for _, c in batch)
    lp = max(len(p) for p, _ in batch)  # TRL pads prompts left, completions right, over the rollout batch
    lc = max(len(c) for _, c in batch)
    for i in range(0, len(batch), args.micro):
        part = batch[i : i + args.micro]
        ids = torch.zeros(len(part), lp + lc, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, c) in enumerate(part):
            ids[j, lp - len(p) : lp + len(c)] = torch.tensor(p + c)
            mask[j, lp - len(p) : lp + len(c)] = 1
        ids, mask = ids.to(args.device), mask.to(args.device)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=lc + 1).logits
        logits = logits[:, :-1, :] / 1.0
        targets, c_mask = ids[:, lp:], mask[:, lp:]
        logp = selective_log_softmax(logits, targets)
        ratio = torch.exp(logp - logp.detach())
        a = adv[i : i + args.micro].to(args.device)[:, None]
        per_tok = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)
        ((per_tok * c_mask).sum() / total).backward()
    return finish(model, opt)


def model_flops(params: int, layers: int, hidden: int, prompt_len: int, lens: list[int], group: int,
                micro: int) -> dict[str, float]:
    """Each path's model FLOPs for one step (recomputation not counted): 6 x params per token it runs, plus
    12 x layers x hidden per causal query-key pair (fwd+bwd). TRL runs every sequence whole; ours runs a prompt
    once in every micro-batch that holds part of its group, and each completion against its prompt's keys."""
    per_pair = 12 * layers * hidden
    runs = sum(len({j // group for j in range(i, min(i + micro, len(lens)))}) for i in range(0, len(lens), micro))
    lp = prompt_len
    return {"trl": sum(6 * params * (lp + n) + per_pair * (lp + n) ** 2 / 2 for n in lens),
            "ours": 6 * params * (runs * lp + sum(lens))
            + per_pair * (runs * lp**2 / 2 + sum(n * lp + n * n / 2 for n in lens))}


def child(args) -> None:
    import torch

    model, batch, adv = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    fn = step_ours if args.child == "ours" else step_trl
    grad_norm = fn(model, batch, adv, args, opt)  # warm-up (allocations, kernels); same weights on both sides
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fn(model, batch, adv, args, opt)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    import resource

    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": min(times), "peak_gib": peak, "params": params, "grad_norm": grad_norm}))


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, v in SHAPE_1P5B.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion", type=int, default=768)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--lengths", choices=("varied", "fixed"), default="varied")
    ap.add_argument("--chunk", type=int, default=256, help="ours: optim.logprob_chunk_size")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", help="keep activations")
    ap.add_argument("--layout", default="prefix", help="ours: prefix | padded | packed")
    ap.add_argument("--child", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    res = {}
    for which in ("ours", "trl"):
        p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", which], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
        if p.returncode != 0:
            raise SystemExit(f"{which} failed:\n{p.stderr[-3000:]}")
        res[which] = json.loads(p.stdout.strip().splitlines()[-1])
    lens, lp = completion_lengths(args), args.prompt_len
    tokens = sum(lens)  # trained (completion) tokens
    flops = model_flops(res["ours"]["params"], args.layers, args.hidden, lp, lens, args.group, args.micro)
    for k in ("ours", "trl"):
        r = res[k]
        r["tokens_per_s"] = tokens / r["seconds"]
        r["mfu"] = flops[k] / r["seconds"] / (args.peak_tflops * 1e12) if args.device == "cuda" else None
    res["ratio_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    res["ratio_peak_memory"] = res["ours"]["peak_gib"] / res["trl"]["peak_gib"]
    print(f"{args.layers} layers x {args.hidden} hidden, vocab {args.vocab} ({res['ours']['params'] / 1e6:.0f}M "
          f"params), {args.prompts}x{args.group} sequences of {args.prompt_len}+{args.completion} tokens "
          f"({args.lengths}: {tokens} completion tokens), "
          f"micro-batch {args.micro}, {args.device}/{args.dtype}, checkpointing {args.checkpointing}, "
          f"our layout {args.layout}")
    for k in ("ours", "trl"):
        r = res[k]
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(f"{k:5s} {r['seconds']:8.2f} s  {r['tokens_per_s']:9.1f} trained tok/s  "
              f"peak {r['peak_gib']:6.2f} GiB{mfu}")
    print(f"ours/TRL: {res['ratio_tokens_per_s']:.2f}x tokens/s, {res['ratio_peak_memory']:.2f}x peak memory; "
          f"first-step gradient norm {res['ours']['grad_norm']:.6g} vs {res['trl']['grad_norm']:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
