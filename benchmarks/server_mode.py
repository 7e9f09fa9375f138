"""Server mode, synchronous against asynchronous rollouts, in the same run: one `grpo serve` (vLLM's own server)
and the trainer on this machine, the default recipe for a few steps each way.

    .venv/bin/python benchmarks/server_mode.py [--steps 4] [--model PATH] [--json F] [override ...]

Prints per mode the mean over steps 2.. (step 1 has nothing to overlap with) of: the step time, the time the
trainer waited for its rollouts (`time/wait_rollout`, async only), generation, update and weight sync; and the
ratio of step times. On one machine the server and the trainer share the cores, so the overlap gains little
here; `expected_speedup` is the analytic model for separate GPUs: a synchronous step costs generate + update +
sync, an asynchronous one max(generate, update) + sync.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-arith.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(model: str, work: Path, extra: list[str]):
    from grpo.commands.serve import running

    return running(RECIPE, [f"model.path={model}", *extra], work, timeout=600)


def train(url: str, model: str, out: Path, steps: int, asynchronous: bool, extra: list[str]) -> list[dict]:
    args = [f"model.path={model}", f"output_dir={out}", f"steps={steps}", "rollout.engine=vllm_server",
            f"rollout.vllm.servers=[{url}]", f"rollout.vllm.sync_port={free_port()}", "eval.at_start=false",
            "eval.at_end=false", "eval.every=0", "checkpoint.every=0", "checkpoint.save_final_model=false",
            f"rollout.async={'true' if asynchronous else 'false'}", *extra]
    p = subprocess.run([sys.executable, "-m", "grpo", "train", str(RECIPE), *args], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict]) -> dict[str, float]:
    later = [r for r in records if r["step"] > 1] or records
    keys = ("time/step", "time/wait_rollout", "time/generate", "time/update", "time/sync", "tokens_per_second")
    return {k: statistics.mean(r[k] for r in later) for k in keys if all(k in r for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--json", default=None)
    ap.add_argument("--server", default=None,
                    help="the URL of a running `grpo serve` of --model to use (default: start one for the run)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value for the trainer (and the server)")
    args = ap.parse_args()
    from grpo.runtime.model import resolve_model_path

    model = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with contextlib.nullcontext(args.server) if args.server else server(model, work, args.overrides) as url:
            sync = summary(train(url, model, work / "sync", args.steps, False, args.overrides))
            asyn = summary(train(url, model, work / "async", args.steps, True, args.overrides))
    gen, upd, syn = sync["time/generate"], sync["time/update"], sync["time/sync"]
    out = {"sync": sync, "async": asyn, "step_time_ratio_async_over_sync": asyn["time/step"] / sync["time/step"],
           "expected_speedup_on_separate_devices": (gen + upd + syn) / (max(gen, upd) + syn)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
