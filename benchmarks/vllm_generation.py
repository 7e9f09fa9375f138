"""Generation throughput of the rollout engines, same model and batch, and the weight-sync time of colocated vLLM.

    .venv/bin/python benchmarks/vllm_generation.py [--prompts 8] [--n 8] [--max-new-tokens 64] [--reps 3] [--json F]

Model: the embedded SmolLM2-135M-Instruct in float32 (on CUDA: pass --device cuda --dtype bfloat16). Prompts: the
default recipe's arithmetic problems, chat-templated. Both engines sample at temperature 1 and record the sampling
logprobs; tokens/s counts generated tokens (completions stop at EOS, so lengths differ a little between engines).
The sync figure is one `VLLMEngine.sync`: bucketed copy into vLLM, prefix-cache reset, checksum and canary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="", help="an HF folder (default: the embedded SmolLM2-135M-Instruct; the tests "
                                                "smoke-run a tiny one)")
    args = ap.parse_args()

    from grpo.config import load_config
    from grpo.data import load_rows, render
    from grpo.rollout.base import SamplingParams, stop_ids
    from grpo.rollout.hf import HFEngine
    from grpo.rollout.vllm_engine import VLLMEngine, probe_ids
    from grpo.runtime.model import load_model, load_tokenizer, resolve_model_path

    cfg = load_config("recipes/smollm2-135m-arith.yaml", [f"model.dtype={args.dtype}", f"device={args.device}",
                                                           f"rollout.max_new_tokens={args.max_new_tokens}"]
                      + ([f"model.path={args.model}"] if args.model else []))
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    rows, _ = load_rows(cfg.data)
    prompts = [r["prompt_ids"] for r in render(rows, cfg.data, tok).rows[: args.prompts]]
    model = load_model(path, cfg.model.dtype).to(args.device)
    threads_before = torch.get_num_threads()
    params = SamplingParams(args.max_new_tokens, 1.0, 1.0)

    def measure(engine) -> tuple[float, int]:
        times, toks = [], 0
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = engine.generate(prompts, args.n, params)
            times.append(time.perf_counter() - t0)
            toks = sum(len(c.ids) for g in out for c in g)
        return statistics.median(times), toks

    hf = HFEngine(model, tok, batch_size=args.prompts * args.n)
    hf_t, hf_tok = measure(hf)
    t0 = time.perf_counter()
    vl = VLLMEngine(cfg, path, tok, args.device, 0, 1, stop_ids(tok, model), probe_ids(tok, prompts[0]),
                    getattr(model.config, "max_position_embeddings", None))
    start_s = time.perf_counter() - t0
    threads_after = torch.get_num_threads()
    vl.generate(prompts[:1], 2, params)  # warm-up
    vl_t, vl_tok = measure(vl)
    syncs = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        m = vl.sync(model)
        syncs.append(time.perf_counter() - t0)
    res = {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
           "hf": {"seconds": hf_t, "tokens": hf_tok, "tokens_per_s": hf_tok / hf_t},
           "vllm": {"seconds": vl_t, "tokens": vl_tok, "tokens_per_s": vl_tok / vl_t, "startup_s": start_s},
           "speedup_tokens_per_s": (vl_tok / vl_t) / (hf_tok / hf_t),
           "sync_s": statistics.median(syncs), "sync_check": m,
           "torch_threads_before_after_vllm": [threads_before, threads_after]}
    print(f"batch: {args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, "
          f"{args.device}/{args.dtype}")
    print(f"HF generate  {hf_t:7.2f} s  {hf_tok:5d} tokens  {hf_tok / hf_t:8.1f} tok/s")
    print(f"vLLM         {vl_t:7.2f} s  {vl_tok:5d} tokens  {vl_tok / vl_t:8.1f} tok/s  "
          f"({res['speedup_tokens_per_s']:.2f}x HF; start-up {start_s:.1f} s)")
    print(f"weight sync (colocated, incl. checksum + canary): {res['sync_s']:.3f} s   {m}")
    print(f"torch threads before/after starting vLLM: {threads_before}/{threads_after}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
