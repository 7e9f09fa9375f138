"""The GRPO loop. One step, in the order data flows:

    rollout (G completions per prompt) -> rewards -> advantages -> update -> sync -> log -> checkpoint

Every rank samples its own share of prompts (groups never straddle ranks), so advantages are local; only the
loss normalisers (global token and sequence counts) and the logged statistics cross ranks.
Deliberately left out of the default: the reference model (beta = 0) and the second forward for old logprobs
(one pass per batch makes the ratio exactly 1).

The phases live along the data flow: grpo/loop/state.py (set-up), grpo/rollout/source.py and grpo/rollout/scoring.py
(rollouts, rewards, advantages), grpo/loop/update.py (the policy update), grpo/loop/evaluate.py,
grpo/runtime/tracking.py (metrics and records).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from grpo.config import Config, to_dict
from grpo.data import PromptSampler
from grpo.loop.evaluate import evaluate
from grpo.loop.state import RunState, setup
from grpo.loop.update import update
from grpo.rollout.scoring import Prefetch, Rollouts, collect, collect_async
from grpo.runtime import checkpoint as ckpt
from grpo.runtime import collectives as coll
from grpo.runtime.export import push_to_hub, save_final
from grpo.runtime.tracking import Metrics, Timer, peak_memory_gib, rollout_records, step_metrics, write_records

log = logging.getLogger("grpo")


class Preempted(Exception):
    """Raised after a signal-triggered checkpoint; the CLI turns it into PREEMPTED_EXIT (slurm requeues)."""


PREEMPTED_EXIT = 85


class StopFlag:
    """SIGTERM / SIGUSR1 (slurm's warning, Ctrl-C's cousin) only set a flag; the ranks agree on it at a step
    boundary, then checkpoint and stop together. A second signal, or one during a save, changes nothing more."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this step, then checkpoint and exit", signal.Signals(signum).name)
        self.signum = signum

    def agreed(self) -> bool:
        return coll.any_rank(self.signum is not None)


def stop_for_requeue(step: int, rank: int) -> NoReturn:
    """After the signal's checkpoint: leave the marker launchers need (torchrun hides our exit code) and raise
    Preempted, which the CLI turns into PREEMPTED_EXIT."""
    marker = os.environ.get("GRPO_PREEMPT_MARKER")
    if marker and rank == 0:
        Path(marker).write_text(f"{step}\n")
    raise Preempted(f"stopped by signal after step {step}; checkpoint written, resume with the same command")


def log_step(cfg: Config, run: RunState, step: int, ro: Rollouts, upd: dict[str, float], trainer_lp: list,
             timer: Timer, t0: float, run_dir: Path) -> dict[str, Any]:
    """The step's metrics record (reduced over ranks) and its rollout records (written by rank 0)."""
    groups, names = ro.groups, [r.name for r in run.rewards]
    rec = {"step": step, **step_metrics(groups, names, ro.rounds), **upd}
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


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last metrics line, for the model card; {} when there is none or it was cut off (rank 0 reads it, and a
    failure here must not keep it from the collective export that follows)."""
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}


@dataclass
class Pipeline:
    """Async rollouts (rollout.async): the next step's generation, in flight while this step updates."""

    pending: Prefetch | None = None


def run_step(cfg: Config, run: RunState, sampler: PromptSampler, step: int, run_dir: Path,
             pipe: Pipeline | None = None) -> dict[str, Any]:
    """One GRPO step, from sampling to the checked weight sync; returns its metrics record."""
    timer, t0 = Timer(), time.perf_counter()
    args = (cfg, run.rollout, run.prompts, run.rewards, run.pool, sampler, run.rank,
            run.learner.shape.prompts_per_rank, step, timer)
    if cfg.rollout.async_ and pipe is not None:  # this step's groups were sampled during the last update
        ro, pipe.pending = collect_async(*args, pipe.pending)
    else:
        ro = collect(*args)  # generate + score + advantages
    run.rollout.release()  # a colocated vLLM engine frees its GPU memory for the update
    upd = update(cfg, run.learner, ro.groups, timer)  # logprobs + loss + backward + step
    with timer("sync"):
        upd.metrics.update(run.rollout.sync(run.policy.module, step))  # new weights to the engine, checked
    return log_step(cfg, run, step, ro, upd.metrics, upd.trainer_logprob_mean, timer, t0, run_dir)


def checkpoint_meta(cfg: Config, run: RunState, sampler: PromptSampler, step: int, wandb_id: str | None,
                    pipe: Pipeline | None = None) -> dict[str, Any]:
    """What a resume needs besides DeepSpeed's own state: the step, the data order, and the config to match. With
    a generation in flight (async), the sampler from before it took its prompts: a resume takes them again."""
    pending = pipe.pending if pipe is not None else None
    return {"step": step, "sampler": pending.sampler_state if pending is not None else sampler.state(),
            "world_size": run.world, "wandb_id": wandb_id, "config": to_dict(cfg)}


class Progress:
    """Rank 0's view of the loop: tqdm on a terminal; otherwise (a slurm .out file) one plain line per step."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.bar = total, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="grpo", dynamic_ncols=True)

    def step(self, rec: dict[str, Any]) -> None:
        acc = rec.get("eval/accuracy")
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{rec['reward/mean']:.3f}",
                                 **({"eval_acc": f"{acc:.3f}"} if acc is not None else {}))
            self.bar.update(1)
            return
        log.info("step %d/%d reward %.3f%s %.1f s %.0f tokens/s", rec["step"], self.total, rec["reward/mean"],
                 f" eval_acc {acc:.3f}" if acc is not None else "", rec["time/step"], rec["tokens_per_second"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_run(cfg: Config, engine, rank: int, world: int, sampler: PromptSampler) -> tuple[int, Metrics | None]:
    """The run directory, the checkpoint to resume from (the step it ends), and rank 0's metrics writer (grpo train
    and grpo sft alike)."""
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    coll.barrier()
    start, wandb_id = 0, None
    resumed = ckpt.load_latest(engine, run_dir / "checkpoints", cfg.checkpoint.resume, rank, world, to_dict(cfg))
    if resumed is not None:
        path, meta = resumed
        start, wandb_id = meta["step"], meta.get("wandb_id")
        sampler.load_state(meta["sampler"])
        log.info("resumed from %s at step %d", path, start)
    metrics = None
    if rank == 0:
        metrics = Metrics(run_dir, to_dict(cfg), cfg.log.wandb, cfg.log.wandb_project, wandb_id)
        metrics.truncate_after(start)  # lines written after the checkpoint we resume from are redone
    return start, metrics


def train(cfg: Config) -> Path:
    run = setup(cfg)
    stop = StopFlag()
    run_dir = Path(cfg.output_dir)
    sampler = PromptSampler(len(run.prompts.rows), cfg.seed)
    start, metrics = open_run(cfg, run.policy, run.rank, run.world, sampler)
    if cfg.rollout.engine != "hf":  # the engine loaded model.path: check the pipeline, and catch up on a resume
        log.info("initial weight sync: %s", run.rollout.sync(run.policy.module, start))
    if start == 0 and cfg.eval.at_start:
        ev = evaluate(cfg, run, 0, run_dir)
        if metrics is not None and ev:
            metrics.log({"step": 0, **ev})
            log.info("eval at step 0: %s", ev)
    progress = Progress(cfg.steps, start) if run.rank == 0 else None
    pipe = Pipeline()
    try:
        for step in range(start + 1, cfg.steps + 1):
            rec = run_step(cfg, run, sampler, step, run_dir, pipe)
            if (cfg.eval.every and step % cfg.eval.every == 0) or (step == cfg.steps and cfg.eval.at_end):
                rec.update(evaluate(cfg, run, step, run_dir))
            if metrics is not None:
                metrics.log(rec)
                progress.step(rec)
            stopping = stop.agreed()
            if stopping or step == cfg.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                meta = checkpoint_meta(cfg, run, sampler, step, metrics.wandb_id if metrics else None, pipe)
                ckpt.save(run.policy, run_dir / "checkpoints", step, meta, run.rank, cfg.checkpoint.keep)
            if stopping and step < cfg.steps:
                stop_for_requeue(step, run.rank)
        if cfg.checkpoint.save_final_model:
            save_final(run.policy, run.tok, run_dir / "final", to_dict(cfg),
                       last_metrics(run_dir) if run.rank == 0 else {})
            if cfg.log.push_to_hub and run.rank == 0:
                log.info("pushed the final model: %s", push_to_hub(run_dir / "final", cfg.log.push_to_hub))
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        run.close()
    return run_dir


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
