"""What a run leaves behind for people: metrics (JSONL always, wandb when enabled), rollout and eval records.

Rollout records are one parquet file per step under `rollouts/`, one row per completion, with a schema version;
the notebook and `grpo inspect` read only these files and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1


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
