"""Held-out evaluation: greedy (accuracy), or k samples per problem (accuracy over samples and pass@k).

The held-out rows are split over the ranks; counts are summed over ranks and the records written by rank 0 to
`eval/step-N.parquet`, next to the rollout records.
"""

from __future__ import annotations

import math
from pathlib import Path

from grpo.config import Config
from grpo.loop.state import RunState
from grpo.rollout.base import SamplingParams
from grpo.rollout.scoring import score_groups
from grpo.runtime import collectives as coll
from grpo.runtime.tracking import write_records
from rewards.runner import Reward, TrainerState


def accuracy_reward(rewards: list[Reward]) -> str:
    """The reward read as correctness: `accuracy` when the recipe has it, else its first reward."""
    return "accuracy" if any(r.name == "accuracy" for r in rewards) else rewards[0].name


def evaluate(cfg: Config, run: RunState, step: int, run_dir: Path) -> dict[str, float]:
    """Accuracy and mean reward on the held-out split: `eval/accuracy` is the mean over samples and, with k > 1
    samples per problem, `eval/pass@k` the share of problems solved at least once."""
    held, rank, rewards = run.held, run.rank, run.rewards
    if held is None:
        return {}
    k = cfg.eval.num_samples
    rows = held.rows[rank :: run.world]
    params = SamplingParams(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, cfg.eval.temperature,
                            greedy=k == 1)
    # a rank with no held-out rows still takes part when generating is collective (ZeRO-3's one gather)
    collective = getattr(run.rollout, "collective_generate", False)
    comps = run.rollout.generate([r["prompt_ids"] for r in rows], k, params) if rows or collective else []
    records, sums = [], {"correct": 0.0, "solved": 0.0, "reward": 0.0, "problems": 0.0}
    acc_name = accuracy_reward(rewards)
    if rows:
        groups, _, _ = score_groups(rows, comps, rewards, held, run.pool, TrainerState(step, cfg.steps))
        for g in groups:
            hits = [g.rewards[acc_name][j] == 1.0 for j in range(k)]
            sums["correct"] += sum(hits)
            sums["solved"] += any(hits)
            sums["reward"] += sum(0.0 if math.isnan(t) else t for t in g.total)
            sums["problems"] += 1
            for j, c in enumerate(g.completions):
                records.append({"step": step, "prompt_id": g.row["prompt_id"], "prompt": g.row["prompt"],
                                "completion": c.text, "answer": str(g.row.get("answer", "")), "sample_index": j,
                                "correct": hits[j], "reward_total": g.total[j], "num_tokens": len(c.ids),
                                "finish_reason": c.finish_reason,
                                **{f"reward/{name}": v[j] for name, v in g.rewards.items()}})
    gathered = coll.gather_objects(records)
    s = coll.sum_named(sums)
    if rank == 0:
        write_records(run_dir / "eval" / f"step-{step:06d}.parquet", [r for part in gathered for r in part])
    n = s["problems"]
    out = {"eval/accuracy": s["correct"] / max(n * k, 1), "eval/reward": s["reward"] / max(n * k, 1),
           "eval/num_problems": n}
    if k > 1:
        out[f"eval/pass@{k}"] = s["solved"] / max(n, 1)
    return out
