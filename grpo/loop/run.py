"""The run scaffold `grpo train` and `grpo sft` share: the run directory, the resume, the step loop with its
checkpoints, the preemption exit, rank 0's progress and metrics, and the final export. Each command supplies a `Job`
(its set-up done, its one step as a function); `run_loop` does the rest the same way for both.

Preemption: SIGTERM / SIGUSR1 (slurm's warning) only set a flag; the ranks agree on it at a step boundary, then
checkpoint and raise `Preempted`, which the CLI turns into PREEMPTED_EXIT so that slurm requeues the job and the
same command resumes exactly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from grpo.config import Config, to_dict
from grpo.data import PromptSampler
from grpo.runtime import checkpoint as ckpt
from grpo.runtime import collectives as coll
from grpo.runtime.export import push_to_hub, save_final
from grpo.runtime.tracking import Metrics

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


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last metrics line, for the model card; {} when there is none or it was cut off (rank 0 reads it, and a
    failure here must not keep it from the collective export that follows)."""
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}


def checkpoint_meta(cfg: Config, step: int, sampler_state: dict[str, Any], world: int,
                    wandb_id: str | None) -> dict[str, Any]:
    """What a resume needs besides DeepSpeed's own state: the step, the data order, and the config to match."""
    return {"step": step, "sampler": sampler_state, "world_size": world, "wandb_id": wandb_id,
            "config": to_dict(cfg)}


class Progress:
    """Rank 0's view of the loop: tqdm on a terminal when the job has a postfix for it; otherwise (a slurm .out
    file) one plain line per step."""

    def __init__(self, total: int, start: int, line: Callable[[dict[str, Any], int], str],
                 postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None) -> None:
        self.total, self.line, self.postfix, self.bar = total, line, postfix, None
        if postfix is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="grpo", dynamic_ncols=True)

    def step(self, rec: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix(rec))
            self.bar.update(1)
            return
        log.info("%s", self.line(rec, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_run(cfg: Config, policy, rank: int, world: int, sampler: PromptSampler) -> tuple[int, Metrics | None]:
    """The run directory, the checkpoint to resume from (the step it ends), and rank 0's metrics writer."""
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    coll.barrier()
    start, wandb_id = 0, None
    resumed = ckpt.load_latest(policy, run_dir / "checkpoints", cfg.checkpoint.resume, rank, world, to_dict(cfg))
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


def _no_begin(start: int, metrics: Metrics | None) -> None:
    """A job with nothing to do between the resume and its first step."""


@dataclass
class Job:
    """What a command gives the run loop: its set-up done, and its step."""

    cfg: Config
    policy: Any  # the DeepSpeed engine: checkpointed, and exported at the end
    tok: Any
    rank: int
    world: int
    sampler: PromptSampler  # the data order, restored by a resume
    steps: int
    step: Callable[[int], dict[str, Any]]  # one step: its metrics record (the same on every rank)
    sampler_state: Callable[[], dict[str, Any]]  # what a checkpoint saves of the data order
    line: Callable[[dict[str, Any], int], str]  # rank 0's progress line for a step's record (and the total)
    postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None  # tqdm's, on a terminal (None: lines only)
    begin: Callable[[int, Metrics | None], None] = _no_begin  # after the resume, before the first step
    push: bool = False  # push final/ to log.push_to_hub


def run_loop(job: Job) -> Path:
    """Resume, then step, log and checkpoint until `job.steps`; a signal checkpoints and stops for a requeue. The
    final model is exported (and pushed) once the last step is done."""
    cfg, rank = job.cfg, job.rank
    run_dir = Path(cfg.output_dir)
    stop = StopFlag()
    start, metrics = open_run(cfg, job.policy, rank, job.world, job.sampler)
    progress = None
    try:
        job.begin(start, metrics)
        progress = Progress(job.steps, start, job.line, job.postfix) if metrics is not None else None
        for step in range(start + 1, job.steps + 1):
            rec = job.step(step)
            if metrics is not None:
                metrics.log(rec)
                progress.step(rec)
            stopping = stop.agreed()
            if stopping or step == job.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                meta = checkpoint_meta(cfg, step, job.sampler_state(), job.world,
                                       metrics.wandb_id if metrics else None)
                ckpt.save(job.policy, run_dir / "checkpoints", step, meta, rank, cfg.checkpoint.keep)
            if stopping and step < job.steps:
                stop_for_requeue(step, rank)
        if cfg.checkpoint.save_final_model:
            save_final(job.policy, job.tok, run_dir / "final", to_dict(cfg),
                       last_metrics(run_dir) if rank == 0 else {})
            if job.push and cfg.log.push_to_hub and rank == 0:
                log.info("pushed the final model: %s", push_to_hub(run_dir / "final", cfg.log.push_to_hub))
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
    return run_dir
