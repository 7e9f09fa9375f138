"""Training forward+backward time of the three logprob layouts on the embedded model, same batch:
8 prompts x 8 completions (32 prompt tokens, 22 completion tokens), micro-batches of 16 sequences.

    .venv/bin/python benchmarks/logprob_layouts.py [--reps 2] [--lengths varied]

`prefix` runs each prompt once per micro-batch, in one flat stream with its group's completions; `padded` and
`packed` run every sequence whole. All three give the same logprobs and gradients (tests/unit/algo/test_logprobs.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs
from grpo.runtime.model import embedded_model_dir, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--lengths", choices=["fixed", "varied"], default="fixed",
                    help="completions of 22 tokens, or of 1 to 43 (mean 22): where padding costs and a wrong mask "
                         "would show")
    ap.add_argument("--model", default="", help="an HF folder (default: the embedded SmolLM2-135M-Instruct; the "
                                                "tests run a tiny one)")
    args = ap.parse_args()
    model = load_model(args.model or str(embedded_model_dir()), "float32")
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(8):
        prompt = torch.randint(10, 40000, (32,), generator=g).tolist()
        for _ in range(8):
            n = 22 if args.lengths == "fixed" else int(torch.randint(1, 44, (1,), generator=g))
            seqs.append(Sequence(prompt, torch.randint(10, 40000, (n,), generator=g).tolist()))
    times, grads = {}, {}
    for layout in ("prefix", "padded", "packed"):
        best = float("inf")
        for _ in range(args.reps):
            model.zero_grad()
            t0 = time.perf_counter()
            for i in range(0, len(seqs), 16):
                lp, _ = completion_logprobs(model, build_micro_batch(seqs[i : i + 16], 2, layout), 1.0)
                lp.sum().backward()
            best = min(best, time.perf_counter() - t0)
        times[layout] = best
        grads[layout] = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    for layout, t in times.items():
        print(f"{layout:8s} {t:7.2f} s   ({times['padded'] / t:.2f}x padded)   grad norm {float(grads[layout]):.6g}")


if __name__ == "__main__":
    main()
