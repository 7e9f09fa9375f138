"""Scoring throughput on this machine: completions per second for math and code rewards, in-process vs in
killable worker processes, and code with vs without the sandbox.

    .venv/bin/python benchmarks/reward_throughput.py [--n 200] [--workers 2] [--json out.json]

Prints a table and (optionally) JSON. The unsandboxed code figure uses GRPO_UNSAFE_NO_SANDBOX=1 on trusted,
generated code only, to show what the sandbox costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from rewards.pool import WorkerPool
from rewards.runner import Reward, score


def math_batch(n: int) -> tuple[list[str], dict]:
    rng = random.Random(0)
    comps, golds = [], []
    for i in range(n):
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        ans = a + b if i % 3 else a + b + 1
        form = i % 4
        comps.append([f"{a} + {b} = {ans}", f"The answer is \\boxed{{{ans}}}", f"so it is {ans}.",
                      f"\\boxed{{\\frac{{{2 * ans}}}{{2}}}}"][form])
        golds.append(str(a + b))
    return comps, {"answer": golds}


def code_batch(n: int) -> tuple[list[str], dict]:
    tests = json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(20, 22) == 42"])
    comps = [f"```python\ndef add(a, b):\n    return a + b{' + 1' if i % 2 else ''}\n```" for i in range(n)]
    return comps, {"tests": [tests] * n}


def rate(rewards, comps, cols, pool=None) -> float:
    t0 = time.perf_counter()
    s = score(rewards, comps, cols, pool)
    dt = time.perf_counter() - t0
    assert not any(s.errors.values()), s.error_messages[:2]
    return len(comps) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from rewards import BoundReward

    acc = [Reward("accuracy", BoundReward("accuracy"))]
    boxed = [Reward("accuracy", BoundReward("accuracy", args={"extract": "boxed"}))]
    code = [Reward("code_tests", BoundReward("code_tests"), timeout=30)]
    mc, mcols = math_batch(args.n)
    cc, ccols = code_batch(max(20, args.n // 5))
    rows = []
    with WorkerPool(args.workers) as pool:
        pool.map(len, [(("warm",), {})] * args.workers, timeout=60)  # spawn cost is paid once per run
        rows.append(("math, last number, in-process", rate(acc, mc, mcols)))
        rows.append((f"math, last number, {args.workers} workers", rate(acc, mc, mcols, pool)))
        rows.append(("math, boxed (math-verify), in-process", rate(boxed, mc, mcols)))
        rows.append((f"math, boxed (math-verify), {args.workers} workers", rate(boxed, mc, mcols, pool)))
        rows.append(("code, sandboxed, in-process", rate(code, cc, ccols)))
        rows.append((f"code, sandboxed, {args.workers} workers", rate(code, cc, ccols, pool)))
        os.environ["GRPO_UNSAFE_NO_SANDBOX"] = "1"
        try:
            rows.append(("code, NOT sandboxed, in-process", rate(code, cc, ccols)))
        finally:
            del os.environ["GRPO_UNSAFE_NO_SANDBOX"]
    width = max(len(r[0]) for r in rows)
    print(f"{'configuration':<{width}}  completions/s")
    for name, r in rows:
        print(f"{name:<{width}}  {r:12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: r for name, r in rows}, f, indent=1)


if __name__ == "__main__":
    main()
