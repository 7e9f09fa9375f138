"""Reading a run directory for people: the notebook and `grpo inspect` both use these functions.

They read only what the trainer publishes: `metrics.jsonl`, `rollouts/step-*.parquet` and `eval/step-*.parquet`
(each parquet file is renamed into place when complete, so a run still being written is readable; a torn last
metrics line is skipped). Records carry a schema version; an unknown one is refused with a clear message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from grpo.runtime.tracking import READABLE_VERSIONS, SCHEMA_VERSION


class RunError(ValueError):
    """A run directory that cannot be read; the message says why and what to do."""


@dataclass
class Run:
    path: Path
    metrics: pd.DataFrame  # one row per metrics line (train steps, plus eval-only lines such as step 0)
    rollouts: pd.DataFrame  # one row per completion
    evals: pd.DataFrame  # one row per eval completion

    @property
    def reward_names(self) -> list[str]:
        return [c[len("reward/"):] for c in self.rollouts.columns if c.startswith("reward/")]

    @property
    def train_metrics(self) -> pd.DataFrame:
        return self.metrics[self.metrics.get("reward/mean").notna()] if "reward/mean" in self.metrics else \
            self.metrics.iloc[0:0]


def _read_parquets(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("step-*.parquet")) if folder.is_dir() else []
    frames = []
    for f in files:
        try:
            df = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise RunError(f"{f}: unreadable parquet file ({type(e).__name__}: {e})") from None
        versions = set(df["schema_version"].unique()) if "schema_version" in df else {0}
        if not versions <= READABLE_VERSIONS:
            raise RunError(f"{f}: records of schema version {sorted(versions)}, this grpo reads versions "
                           f"{sorted(READABLE_VERSIONS)} (it writes {SCHEMA_VERSION}); open the run with the grpo "
                           "version that wrote it")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.exists():
        raise RunError(f"{p}: no such run directory")
    if not p.is_dir():
        raise RunError(f"{p}: not a directory")
    mpath = p / "metrics.jsonl"
    lines = []
    raw = mpath.read_text().splitlines() if mpath.is_file() else []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except ValueError:
            if i != len(raw) - 1:
                raise RunError(f"{mpath}: line {i + 1} is not JSON") from None
            # a torn last line: the run is still writing it
    rollouts = _read_parquets(p / "rollouts")
    evals = _read_parquets(p / "eval")
    if not lines and rollouts.empty:
        raise RunError(f"{p}: no metrics.jsonl lines and no rollouts/ records: not a grpo run directory, or "
                       "the run has not finished its first step yet")
    metrics = pd.DataFrame(lines)
    if not metrics.empty:
        metrics = metrics.groupby("step", as_index=False).last().sort_values("step")
    return Run(p, metrics, rollouts, evals)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, have {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_table(evals: pd.DataFrame) -> pd.DataFrame:
    """pass@k per eval step for k = 1 .. samples per problem."""
    if evals.empty:
        return pd.DataFrame()
    rows = []
    for step, df in evals.groupby("step"):
        per = df.groupby("prompt_id")["correct"].agg(["size", "sum"])
        n = int(per["size"].min())
        for k in range(1, n + 1):
            rows.append({"step": step, "k": k,
                         "pass@k": float(sum(pass_at_k(int(s), int(c), k) for s, c in per.values) / len(per))})
    return pd.DataFrame(rows)


def group_table(run: Run, step: int, prompt_id: str) -> pd.DataFrame:
    """One group: its G completions with each reward, the total, advantage and finish reason."""
    df = run.rollouts[(run.rollouts["step"] == step) & (run.rollouts["prompt_id"] == prompt_id)]
    if df.empty:
        raise RunError(f"no group for prompt {prompt_id!r} at step {step}")
    cols = ["sample_index", "completion", *[f"reward/{n}" for n in run.reward_names], "reward_total", "advantage",
            "num_tokens", "finish_reason", "tool_calls"]
    return df[[c for c in cols if c in df.columns]].sort_values("sample_index")


def group_summary(run: Run, step: int | None = None) -> pd.DataFrame:
    """Per group of a step (default: the last): mean/std reward, zero variance, truncation, errors."""
    r = run.rollouts
    if r.empty:
        raise RunError(f"{run.path}: no rollout records yet")
    step = int(r["step"].max()) if step is None else step
    df = r[r["step"] == step]
    if df.empty:
        raise RunError(f"no rollouts at step {step} (steps recorded: {int(r['step'].min())}..{int(r['step'].max())})")
    g = df.groupby("prompt_id").agg(prompt=("prompt", "first"), answer=("answer", "first"),
                                    reward_mean=("reward_total", "mean"), reward_std=("reward_total", "std"),
                                    truncated=("finish_reason", lambda s: float((s == "length").mean())),
                                    errors=("reward_error", "sum"), tokens=("num_tokens", "mean"))
    g["zero_variance"] = g["reward_std"].fillna(0.0) <= 1e-9
    g["step"] = step
    return g.reset_index().sort_values("reward_mean")


def conversation(run: Run, step: int, prompt_id: str, sample_index: int) -> pd.DataFrame:
    """One completion turn by turn (multi-turn rollouts): what the model wrote, the tool it called with which
    arguments, the answer or error, and the seconds the call took. Empty for a completion without turns."""
    r = run.rollouts
    df = r[(r["step"] == step) & (r["prompt_id"] == prompt_id) & (r["sample_index"] == sample_index)]
    if df.empty:
        raise RunError(f"no completion {sample_index} of prompt {prompt_id!r} at step {step}")
    raw = df["turns"].iloc[0] if "turns" in df else None
    turns = json.loads(raw) if isinstance(raw, str) else []
    cols = ["turn", "text", "tool", "arguments", "result", "error", "seconds"]
    return pd.DataFrame([{"turn": i, **{k: t.get(k) for k in cols[1:]}} for i, t in enumerate(turns)], columns=cols)


def prompt_history(run: Run, prompt_id: str) -> pd.DataFrame:
    """The same prompt across every step it was sampled at (and its eval answers), to see answers change."""
    r = run.rollouts
    df = r[r["prompt_id"] == prompt_id][["step", "sample_index", "completion", "reward_total", "advantage"]]
    return df.sort_values(["step", "sample_index"])


def summary(run: Run) -> dict[str, object]:
    m = run.train_metrics
    out: dict[str, object] = {"run": str(run.path), "steps_logged": int(m["step"].max()) if not m.empty else 0,
                              "completions": len(run.rollouts)}
    if not m.empty:
        first, last = m.iloc[0], m.iloc[-1]
        out["reward (first step -> last step)"] = f"{first['reward/mean']:.3f} -> {last['reward/mean']:.3f}"
        out["completion length (first -> last)"] = (f"{first['completion/len_mean']:.1f} -> "
                                                   f"{last['completion/len_mean']:.1f}")
        out["zero-variance groups (last)"] = f"{last['groups/zero_variance_frac']:.2f}"
        out["median step time (s)"] = f"{m['time/step'].median():.1f}"
        out["reward errors (total)"] = int(m["reward/errors"].sum())
        if "tools/calls_per_completion" in m:
            out["tool calls per completion (first -> last)"] = (f"{first['tools/calls_per_completion']:.2f} -> "
                                                               f"{last['tools/calls_per_completion']:.2f}")
    if "eval/accuracy" in run.metrics:
        ev = run.metrics.dropna(subset=["eval/accuracy"])
        out["eval accuracy by step"] = ", ".join(f"{int(s)}: {a:.3f}" for s, a in zip(ev["step"], ev["eval/accuracy"],
                                                                                       strict=True))
    return out
