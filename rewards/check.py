"""`grpo check-rewards RECIPE CASES.jsonl [overrides]`: score hand-labelled cases with a recipe's rewards and report
every disagreement, so a checker is tested before a long run rather than during it.

A case is one JSON line: the completion, the row's columns the rewards need, and the expected score per reward
name (`null` for "not applicable"), e.g.
    {"completion": "3 + 4 = 7", "answer": "7", "expected": {"accuracy": 1.0}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rewards.pool import WorkerPool
from rewards.runner import build_rewards, score


def load_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            case = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if "completion" not in case or not isinstance(case.get("expected"), dict):
            raise ValueError(f"{path}:{n}: a case needs 'completion' and an 'expected' mapping")
        case["_line"] = n
        cases.append(case)
    if not cases:
        raise ValueError(f"{path}: no cases")
    return cases


def check(reward_specs: list[Any], cases: list[dict[str, Any]], workers: int = 2,
          memory_mb: int = 2048) -> list[dict[str, Any]]:
    """Disagreements: one dict per (case, reward) whose score differs from the expected one."""
    rewards = build_rewards(reward_specs)
    names = {r.name for r in rewards}
    columns = sorted({k for c in cases for k in c if k not in ("completion", "expected", "_line", "note")})
    cols = {k: [c.get(k) for c in cases] for k in columns}
    cols.setdefault("num_tokens", [len(c["completion"].split()) for c in cases])
    cols.setdefault("finish_reason", ["stop"] * len(cases))
    pool = WorkerPool(workers, memory_mb) if workers > 0 else None
    try:
        s = score(rewards, [c["completion"] for c in cases], cols, pool)
    finally:
        if pool is not None:
            pool.close()
    bad = []
    for i, case in enumerate(cases):
        for name, want in case["expected"].items():
            if name not in names:
                bad.append({"line": case["_line"], "reward": name, "expected": want, "got": "reward not in recipe"})
                continue
            got = s.per_reward[name][i]
            got_v = None if math.isnan(got) else got
            same = (want is None and got_v is None) or (want is not None and got_v is not None
                                                         and abs(float(want) - got_v) < 1e-6)
            if not same:
                bad.append({"line": case["_line"], "reward": name, "expected": want, "got": got_v,
                            "completion": case["completion"][:120], "note": case.get("note", "")})
    return bad


def main(recipe: str, cases_path: str, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from grpo.config import ConfigError, load_config

    cfg = load_config(recipe, overrides)
    try:
        cases = load_cases(Path(cases_path))
        bad = check(cfg.rewards, cases, cfg.scoring.workers, cfg.scoring.memory_mb)
    except (ValueError, OSError) as e:  # a bad cases file (the message names file and line) or reward
        raise ConfigError(str(e)) from None
    console = Console()
    checked = sum(len(c["expected"]) for c in cases)
    if not bad:
        console.print(f"[green]{checked} checks on {len(cases)} cases: all agree[/green]")
        return 0
    t = Table(title=f"{len(bad)} of {checked} checks disagree ({cases_path})")
    for col in ("line", "reward", "expected", "got", "completion", "note"):
        t.add_column(col, overflow="fold")
    for b in bad:
        t.add_row(*[str(b.get(k, "")) for k in ("line", "reward", "expected", "got", "completion", "note")])
    console.print(t)
    return 1
