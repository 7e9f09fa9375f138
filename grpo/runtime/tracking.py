"""What a run leaves behind for people: metrics (JSONL always, wandb when enabled), rollout and eval records.

Rollout records are one parquet file per step under `rollouts/`, one row per completion, with a schema version;
the notebook and `grpo inspect` read only these files and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from grpo.algo.advantages import zero_variance_groups
from grpo.runtime import collectives as coll

# 2 added the multi-turn columns (turns, tool_calls); a version-1 file reads as one without tool calls
SCHEMA_VERSION = 2
READABLE_VERSIONS = {1, 2}


class Metrics:
    """Rank 0 only. Appends one JSON line per step (flushed), mirrors to wandb when enabled."""

    def __init__(self, run_dir: Path, config: dict[str, Any], use_wandb: bool, project: str,
                 wandb_id: str | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if use_wandb:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(project=project, dir=str(run_dir), config=config, id=wandb_id,
                                    resume="allow", name=run_dir.name)
            self.wandb_id = self.wandb.id

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, so no step is logged twice."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _line_step(ln) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return 10**12  # a torn last line: dropped


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write a parquet file of records (written aside, then renamed)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["schema_version"] = SCHEMA_VERSION
    table = pa.Table.from_pylist(rows)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


class Timer:
    """Seconds per phase of a step (`with timer("generate"): ...`), summed over repeats."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def rollout_records(step: int, groups: list, trainer_logprob_mean: list[list[float]],
                    policy_version: int) -> list[dict[str, Any]]:
    """One row per completion: what the notebook and `grpo inspect` show (schema: SCHEMA_VERSION)."""
    out = []
    for gi, (g, means) in enumerate(zip(groups, trainer_logprob_mean, strict=True)):
        for j, (c, tot, a) in enumerate(zip(g.completions, g.total, g.advantages, strict=True)):
            lps = c.sampled_logprobs()
            out.append({"step": step, "prompt_id": g.row["prompt_id"], "group_index": gi, "sample_index": j,
                        "prompt": g.row["prompt"], "completion": c.text, "answer": str(g.row.get("answer", "")),
                        **{f"reward/{k}": v[j] for k, v in g.rewards.items()}, "reward_total": tot,
                        "reward_error": math.isnan(tot), "advantage": a, "num_tokens": len(c.ids),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                        "engine_logprob_mean": float(np.mean(lps)) if lps else math.nan,
                        "tool_calls": sum(t["tool"] is not None for t in c.turns or []),
                        "turns": json.dumps(c.turns) if c.turns is not None else None,
                        "trainer_logprob_mean": means[j],
                        "policy_version": policy_version if c.version is None else c.version})
    return out


def tool_metrics(groups: list) -> dict[str, float]:
    """Multi-turn rollouts over all ranks: turns and tool calls per completion, the share of calls that could not be
    read, that failed, that timed out, and the tools' seconds (summed over calls, run in parallel)."""
    turns = [t for g in groups for c in g.completions for t in c.turns or []]
    calls = [t for t in turns if t["arguments"] is not None]  # every call read, malformed ones (no tool) included
    answered = [t for t in calls if t["result"] is not None]
    s = coll.sum_named({"completions": sum(len(g.completions) for g in groups), "turns": len(turns),
                        "calls": len(calls), "malformed": sum(t["tool"] is None for t in calls),
                        "errors": sum(t["error"] is not None and t["tool"] is not None for t in answered),
                        "timeouts": sum(str(t["error"]).startswith("timed out") for t in answered),
                        "seconds": sum(t["seconds"] for t in answered)})
    n, k = max(s["completions"], 1.0), max(s["calls"], 1.0)
    return {"tools/turns_mean": s["turns"] / n, "tools/calls_per_completion": s["calls"] / n,
            "tools/malformed_frac": s["malformed"] / k, "tools/error_frac": s["errors"] / k,
            "tools/timeouts": s["timeouts"], "tools/seconds": s["seconds"]}


def step_metrics(groups: list, reward_names: list[str], rounds: int) -> dict[str, float]:
    """Reward statistics over all ranks' groups (named sums reduced, then divided)."""
    tot = [t for g in groups for t in g.total]
    ok = [t for t in tot if not math.isnan(t)]
    sums = {"r": sum(ok), "r2": sum(x * x for x in ok), "n_ok": len(ok), "n": len(tot),
            "len": sum(len(c.ids) for g in groups for c in g.completions),
            "trunc": sum(c.finish_reason == "length" for g in groups for c in g.completions),
            "zero": zero_variance_groups(torch.tensor([g.total for g in groups])).sum().item() if groups else 0,
            "groups": len(groups)}
    for k in reward_names:
        vals = [v for g in groups for v in g.rewards[k] if not math.isnan(v)]
        sums |= {f"{k}/sum": sum(vals), f"{k}/sq": sum(v * v for v in vals), f"{k}/n": len(vals)}
    s = coll.sum_named(sums)
    mean = s["r"] / max(s["n_ok"], 1.0)
    out = {"reward/mean": mean, "reward/std": math.sqrt(max(s["r2"] / max(s["n_ok"], 1.0) - mean * mean, 0.0)),
           "reward/errors": s["n"] - s["n_ok"], "completion/len_mean": s["len"] / max(s["n"], 1.0),
           "completion/truncated_frac": s["trunc"] / max(s["n"], 1.0),
           "groups/zero_variance_frac": s["zero"] / max(s["groups"], 1.0), "rollout/rounds": rounds}
    for k in reward_names:
        a, b, n = s[f"{k}/sum"], s[f"{k}/sq"], s[f"{k}/n"]
        m = a / n if n else math.nan
        out[f"reward/{k}/mean"] = m
        out[f"reward/{k}/std"] = math.sqrt(max(b / n - m * m, 0.0)) if n else math.nan
        out[f"reward/{k}/not_applicable_or_error"] = s["n"] - n
    return out


def peak_memory_gib(device: str) -> float:
    """Peak memory of this process: the torch allocator's on CUDA, the resident set on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
