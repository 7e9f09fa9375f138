"""The GRPO loop. One step, in the order data flows:

    rollout (G completions per prompt) -> rewards -> advantages -> update -> sync -> log -> checkpoint

Every rank samples its own share of prompts (groups never straddle ranks), so advantages are local; only the
loss normalisers (global token and sequence counts) and the logged statistics cross ranks.
Deliberately left out of the default: the reference model (beta = 0) and the second forward for old logprobs
(one pass per batch makes the ratio exactly 1).

The phases live along the data flow: grpo/loop/state.py (set-up), grpo/rollout/source.py and grpo/rollout/scoring.py
(rollouts, rewards, advantages), grpo/loop/update.py (the policy update), grpo/loop/evaluate.py,
grpo/runtime/tracking.py (metrics and records). Resume, checkpoints, preemption and the final export are the run
scaffold's (grpo/loop/run.py), shared with `grpo sft`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from grpo.config import Config
from grpo.data import PromptSampler
from grpo.loop.evaluate import evaluate
from grpo.loop.run import Job, run_loop
from grpo.loop.state import RunState, setup
from grpo.loop.update import update
from grpo.rollout.scoring import Rollouts
from grpo.rollout.source import SyncSource, rollout_source
from grpo.runtime import collectives as coll
from grpo.runtime.tracking import (
    Metrics,
    Timer,
    peak_memory_gib,
    rollout_records,
    step_metrics,
    tool_metrics,
    write_records,
)

log = logging.getLogger("grpo")


def log_step(cfg: Config, run: RunState, step: int, ro: Rollouts, upd: dict[str, float], trainer_lp: list,
             timer: Timer, t0: float, run_dir: Path) -> dict[str, Any]:
    """The step's metrics record (reduced over ranks) and its rollout records (written by rank 0)."""
    groups, names = ro.groups, [r.name for r in run.rewards]
    rec = {"step": step, **step_metrics(groups, names, ro.rounds), **upd}
    if cfg.rollout.tools:
        rec.update(tool_metrics(groups))
    counts = coll.sum_named({**{f"reward/{k}/errors": ro.errors[k] for k in names},
                             **{f"reward/{k}/timeouts": ro.timeouts[k] for k in names}, "stale": ro.stale})
    if cfg.rollout.async_:
        rec["rollout/stale_groups"] = counts["stale"]
    for k in names:
        rec[f"reward/{k}/errors"], rec[f"reward/{k}/timeouts"] = counts[f"reward/{k}/errors"], \
            counts[f"reward/{k}/timeouts"]
    n_samples = len(groups) * cfg.rollout.num_generations * run.world
    if rec["reward/errors"] > cfg.scoring.max_error_frac * n_samples and run.rank == 0:
        log.error("step %d: %d of %d samples could not be scored (errors/timeouts, see reward/*/errors): they "
                  "are skipped, not zero; check the reward functions", step, rec["reward/errors"], n_samples)
    gen_tokens = coll.all_sum([sum(len(c.ids) for g in groups for c in g.completions)])[0]
    step_time = time.perf_counter() - t0
    rec.update({f"time/{k}": v for k, v in timer.t.items()})
    rec.update({"time/step": step_time, "tokens_per_second": gen_tokens / step_time,
                "memory/peak_gib": peak_memory_gib(run.device)})
    gathered = coll.gather_objects(rollout_records(step, groups, trainer_lp, step - 1) if cfg.log.rollouts else [])
    if run.rank == 0 and cfg.log.rollouts:
        write_records(run_dir / "rollouts" / f"step-{step:06d}.parquet", [r for p in gathered for r in p])
    return rec


def run_step(cfg: Config, run: RunState, source: SyncSource, step: int, run_dir: Path) -> dict[str, Any]:
    """One GRPO step, from sampling to the checked weight sync; returns its metrics record."""
    timer, t0 = Timer(), time.perf_counter()
    ro = source.next(step, timer)  # generate + score + advantages (async: generated during the last update)
    run.rollout.release()  # a colocated vLLM engine frees its GPU memory for the update
    upd = update(cfg, run.learner, ro.groups, timer)  # logprobs + loss + backward + step
    with timer("sync"):
        upd.metrics.update(run.rollout.sync(run.policy.module, step))  # new weights to the engine, checked
    return log_step(cfg, run, step, ro, upd.metrics, upd.trainer_logprob_mean, timer, t0, run_dir)


def train_source(cfg: Config, run: RunState, sampler: PromptSampler, asynchronous: bool | None = None) -> SyncSource:
    """The rollout source of a training run on this rank."""
    return rollout_source(cfg, run.rollout, run.prompts, run.rewards, run.pool, sampler, run.rank,
                          run.learner.shape.prompts_per_rank, asynchronous)


def progress_line(rec: dict[str, Any], total: int) -> str:
    """Rank 0's line per step where there is no terminal (a slurm .out file)."""
    acc = rec.get("eval/accuracy")
    ev = f" eval_acc {acc:.3f}" if acc is not None else ""
    return (f"step {rec['step']}/{total} reward {rec['reward/mean']:.3f}{ev} {rec['time/step']:.1f} s "
            f"{rec['tokens_per_second']:.0f} tokens/s")


def progress_postfix(rec: dict[str, Any]) -> dict[str, str]:
    """tqdm's postfix on a terminal."""
    acc = rec.get("eval/accuracy")
    return {"reward": f"{rec['reward/mean']:.3f}", **({"eval_acc": f"{acc:.3f}"} if acc is not None else {})}


def train(cfg: Config) -> Path:
    run = setup(cfg)
    run_dir = Path(cfg.output_dir)
    sampler = PromptSampler(len(run.prompts.rows), cfg.seed)
    source = train_source(cfg, run, sampler)

    def begin(start: int, metrics: Metrics | None) -> None:
        if cfg.rollout.engine != "hf":  # the engine loaded model.path: check the pipeline, and catch up on a resume
            log.info("initial weight sync: %s", run.rollout.sync(run.policy.module, start))
        if start == 0 and cfg.eval.at_start:
            ev = evaluate(cfg, run, 0, run_dir)
            if metrics is not None and ev:
                metrics.log({"step": 0, **ev})
                log.info("eval at step 0: %s", ev)

    def step(n: int) -> dict[str, Any]:
        rec = run_step(cfg, run, source, n, run_dir)
        if (cfg.eval.every and n % cfg.eval.every == 0) or (n == cfg.steps and cfg.eval.at_end):
            rec.update(evaluate(cfg, run, n, run_dir))
        return rec

    try:
        return run_loop(Job(cfg, run.policy, run.tok, run.rank, run.world, sampler, cfg.steps, step,
                            source.sampler_state, progress_line, progress_postfix, begin, push=True))
    finally:
        run.close()


def evaluate_only(cfg: Config) -> dict[str, float]:
    """`grpo eval`: the held-out evaluation of `model.path` alone (records and one metrics line in output_dir)."""
    run = setup(cfg)
    run_dir = Path(cfg.output_dir)
    if run.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    coll.barrier()
    try:
        ev = evaluate(cfg, run, 0, run_dir)
        if run.rank == 0:
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "model": cfg.model.path, **ev}) + "\n")
    finally:
        run.close()
    return ev
