"""`grpo doctor RECIPE [dotted.key=value ...]`: every path a recipe uses, exercised in minutes, before a long job.

Run it on the first GPU node (or allocation) of a new cluster, under the same launcher as the job (`torchrun
--nproc_per_node N -m grpo doctor RECIPE`, or `sbatch slurm/doctor.slurm RECIPE`). It prints one table, easy to
paste into an issue, with a verdict; the exit code is 0 only when every check passed. The checks, in order (a
failure skips the ones that depend on it):

- devices: what each rank sees (GPUs and their memory, or CPU cores and RAM), one device per process;
- plan: `grpo plan`'s predicted peak per device against the device's memory (`--memory` to pretend less);
- sandbox: when a reward runs code, a program inside bubblewrap (it runs, as nobody, without network, with its
  harness read-only and its own pid namespace);
- set-up: the real `setup()` of `grpo train` (data, model, DeepSpeed engine, rollout engine, reward workers);
- collectives: an all-reduce between the ranks on the backend's device, its result and bus bandwidth;
- first sync: vLLM engines get the trainer's weights and pass the checksum and the canary (colocated: the engine
  sleeps and wakes around each later update on GPUs);
- training steps: two real steps of the recipe at its real batch shape (`run_step`, as `grpo train` runs them),
  finite loss and gradient norm, weights that changed, each step's sync checked;
- memory: the measured peak per device against the plan's prediction;
- checkpoint: the step-1 checkpoint saved (time, size), then loaded back after step 2 changed the weights: the
  weights' float64 checksum must be step 1's again.

Everything is written under `OUTPUT_DIR/doctor` (`output_dir` of the recipe, on the filesystem the job will use),
removed at the end unless `--keep`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grpo.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # type hints only: at run time they load torch, which this module imports lazily
    from grpo.commands.plan import Plan
    from grpo.loop.state import RunState

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
GIB = 2**30
MEMORY_SLACK = 1.3  # the measured peak may exceed the plan by this factor (its CPU figures are within 30%)
Checksum = tuple[float, float]  # grpo.runtime.weights.model_checksum's (sum, sum of squares)


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    figures: str
    fix: str = ""


class Report:
    def __init__(self, title: str) -> None:
        self.title = title
        self.checks: list[Check] = []

    def add(self, name: str, status: str, figures: str, fix: str = "") -> bool:
        return self.push(Check(name, status, figures, fix))

    def push(self, check: Check) -> bool:
        """Record a check; False when it failed (the checks that depend on it are then skipped)."""
        self.checks.append(check)
        return check.status != FAIL

    def skip_rest(self, names: list[str]) -> None:
        done = {c.name for c in self.checks}
        why = "not run: an earlier check failed" if not self.ok else "not run"
        for n in names:
            if n not in done:
                self.add(n, SKIP, why)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [self.title, ""]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {c.status}  {c.figures}")
            if c.fix:
                lines.append(f"{'':<{width}}        fix: {c.fix}")
        failed = [c.name for c in self.checks if c.status == FAIL]
        skipped = sum(c.status == SKIP for c in self.checks)
        lines.append("")
        lines.append(f"verdict: FAIL ({', '.join(failed)})" if failed else
                     f"verdict: PASS ({len(self.checks) - skipped} checks passed, {skipped} skipped)")
        return "\n".join(lines)


CHECKS = ["devices", "plan", "sandbox", "set-up", "collectives", "first sync", "training steps", "memory",
          "checkpoint"]


def devices(device: str, memory_gib: float | None) -> tuple[Check, float]:
    """This rank's device and the memory budget per process."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        if n < local:
            return Check("devices", FAIL, f"{local} processes on this node, {n} GPUs visible",
                         "one process per GPU: --nproc_per_node at most the GPU count, and check "
                         "CUDA_VISIBLE_DEVICES"), 0.0
        props = torch.cuda.get_device_properties(idx)
        free, total = torch.cuda.mem_get_info(idx)
        budget = memory_gib or total / GIB
        return Check("devices", PASS, f"{n} x {props.name} visible, {total / GIB:.1f} GiB each ({free / GIB:.1f} "
                     f"free on GPU {idx}), {local} process(es) on this node; CUDA {torch.version.cuda}"), budget
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    total, avail = (int(info[k].split()[0]) * 1024 / GIB for k in ("MemTotal", "MemAvailable"))
    budget = memory_gib or avail / local
    return Check("devices", PASS, f"cpu: {os.cpu_count()} cores, {total:.1f} GiB RAM ({avail:.1f} available), "
                 f"{local} process(es): {budget:.1f} GiB each"), budget


def plan_check(cfg: Config, world: int, budget: float, device: str):
    from grpo.commands.plan import longest_prompt, plan

    reserve = libraries_rss_gib() if device == "cpu" else None
    p = plan(cfg, world, budget, longest_prompt(cfg), device, cpu_reserve_gib=reserve)
    figures = (f"predicted peak {p.peak_gib:.2f} GiB per device of {budget:.1f} GiB (generation "
               f"{p.generation_gib:.2f}, update {p.update_gib:.2f}), {world} rank(s)"
               + (f"; libraries {reserve:.2f} GiB RSS here" if reserve is not None else ""))
    if p.fits:
        return Check("plan", PASS, figures), p
    return Check("plan", FAIL, figures + ": does not fit",
                 "; ".join(p.advice) or "a smaller model or batch"), p


def libraries_rss_gib() -> float:
    """This process's peak RSS once the trainer's libraries are imported (torch, transformers, deepspeed,
    grpo.loop.train), before any model: the CPU plan's one term that is not derived from shapes. It varies with the
    machine (the kernels' libraries oneDNN and OpenMP load, their buffers), so the memory check reads it here rather
    than trusting grpo.commands.plan.CPU_RESERVE_GIB, measured once on one machine."""
    import resource

    import deepspeed  # noqa: F401 - grpo.runtime.deepspeed_setup imports it lazily, so grpo.loop.train alone leaves it out

    import grpo.loop.train  # noqa: F401 - what a training process holds before its model

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


SANDBOX_PROBE = """
import os, socket
print("uid", os.getuid())
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network yes")
except OSError:
    print("network no")
try:
    open("/harness/x", "w")
    print("harness writable")
except OSError:
    print("harness read-only")
print("pids", sum(p.isdigit() for p in os.listdir("/proc")))
"""


def sandbox_check(cfg: Config) -> Check:
    if not any(r.name == "code_tests" for r in cfg.rewards):
        return Check("sandbox", SKIP, "no reward of this recipe runs code")
    from rewards.sandbox import SandboxUnavailable, check_available, run_python

    try:
        check_available()
    except SandboxUnavailable as e:
        return Check("sandbox", FAIL, str(e), "install bubblewrap (scripts/system-deps.sh) and allow user "
                     "namespaces (sysctl kernel.unprivileged_userns_clone=1), or run as root")
    t0 = time.perf_counter()
    r = run_python(SANDBOX_PROBE)
    seconds = time.perf_counter() - t0
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    bad = []
    if out.get("uid") == "0":
        bad.append("runs as root")
    if out.get("network") != "no":
        bad.append("reaches the network")
    if out.get("harness") != "read-only":
        bad.append("can write its harness")
    if not out.get("pids", "99").isdigit() or int(out["pids"]) > 4:
        bad.append(f"sees {out.get('pids')} processes (no pid namespace)")
    figures = (f"a program ran in {seconds:.2f} s: uid {out.get('uid')}, network {out.get('network')}, harness "
               f"{out.get('harness')}, {out.get('pids')} pids visible")
    if r.status != "ok" or bad:
        return Check("sandbox", FAIL, figures + f" (status {r.status}) " + "; ".join(bad),
                     "the sandbox is not isolating: do not train code rewards here; report this table")
    return Check("sandbox", PASS, figures)


def _du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB


def run_checks(cfg: Config, memory_gib: float | None, report: Report) -> None:
    """The checks in CHECKS' order; a failure returns early, and `doctor` marks the checks left as skipped."""
    from grpo.runtime.deepspeed_setup import pick_device

    device = pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check, budget = devices(device, memory_gib)
    if not report.push(check):
        return
    check, predicted = plan_check(cfg, world, budget, device)
    if not report.push(check) or not report.push(sandbox_check(cfg)):
        return
    started = start_run(cfg, report)
    if started is None:
        return
    run, t0 = started
    try:
        run_checks_on(cfg, run, t0, device, budget, predicted, report)
    finally:
        run.close()


def start_run(cfg: Config, report: Report) -> tuple[RunState, float] | None:
    """`grpo train`'s real `setup()` and the time it started; None when the recipe is refused (recorded as the
    set-up check's failure)."""
    from grpo.loop.state import setup

    t0 = time.perf_counter()
    try:
        return setup(cfg), t0
    except ConfigError as e:
        report.add("set-up", FAIL, str(e), "the message names the key or file to change")
        return None


def run_checks_on(cfg: Config, run: RunState, t0: float, device: str, budget: float, predicted: Plan,
                  report: Report) -> None:
    """The checks that need the set-up run: collectives, first sync, two training steps, memory, checkpoint."""
    report.push(set_up_check(cfg, run, t0))
    if not report.push(collectives_check(device, run.world)) or not report.push(first_sync_check(cfg, run)):
        return
    steps = two_steps(cfg, run, report)
    if steps is None:
        return
    recs, sums, saved, save_s = steps
    report.push(training_steps_check(recs, sums))
    report.push(memory_check(run, device, budget, predicted))
    report.push(checkpoint_check(run, saved, save_s, sums[0]))


def set_up_check(cfg: Config, run: RunState, t0: float) -> Check:
    """What `setup()` built, in the time since `t0`: parameters, dtype, ZeRO stage, engines, prompts."""
    from grpo.runtime.lora import weight_count

    engine = run.policy
    params = weight_count(engine.module)
    return Check("set-up", PASS, f"{time.perf_counter() - t0:.1f} s: {params / 1e6:.1f}M parameters in "
                 f"{cfg.model.dtype}, DeepSpeed ZeRO-{engine.zero_optimization_stage()} on {run.world} rank(s), "
                 f"rollout engine {cfg.rollout.engine}, {len(run.prompts.rows)} training prompts")


def collectives_check(device: str, n: int) -> Check:
    """An all-reduce between the `n` ranks: the sums must be right; its time gives the bus bandwidth."""
    from grpo.runtime import collectives as coll

    nbytes = (256 if device == "cuda" else 16) * 2**20
    seconds, ok = coll.timed_all_reduce(nbytes)
    bus = 2 * (n - 1) / n * nbytes / seconds / 1e9 if n > 1 else 0.0
    fig = (f"all-reduce of {nbytes // 2**20} MiB over {n} rank(s) on {coll.backend_device().type}: "
           f"{seconds * 1e3:.1f} ms" + (f", bus bandwidth {bus:.1f} GB/s" if n > 1 else ""))
    return Check("collectives", PASS if ok else FAIL, fig + ("" if ok else ": WRONG SUMS"),
                 "" if ok else "check the interconnect: NCCL_DEBUG=INFO; NCCL_IB_DISABLE=1 or "
                 "NCCL_SOCKET_IFNAME to rule out a network interface")


def first_sync_check(cfg: Config, run: RunState) -> Check:
    """vLLM engines get the trainer's weights: checksum and canary (the HF engine has nothing to sync)."""
    from grpo.rollout.vllm_engine import SyncError, canary_tolerance

    if cfg.rollout.engine == "hf":
        return Check("first sync", SKIP, "the HF engine generates from the trainer's own weights")
    t0 = time.perf_counter()
    try:
        m = run.rollout.sync(run.policy.module)
    except SyncError as e:
        return Check("first sync", FAIL, str(e), "the rollout engine does not hold the trainer's weights: "
                     "report this table (rollout.vllm.canary=warn goes on regardless)")
    return Check("first sync", PASS, f"{time.perf_counter() - t0:.1f} s, checksum ok, canary mean |diff| "
                 f"{m['sync/canary_mean_abs']:.2g} (tolerance {canary_tolerance(cfg):g}, max "
                 f"{m['sync/canary_max_abs']:.2g})")


def two_steps(cfg: Config, run: RunState, report: Report) -> tuple[list[dict], list[Checksum], Path, float] | None:
    """Two real steps as `grpo train` runs them, the weights' checksum after each, step 1 saved: (records,
    checksums, step 1's checkpoint, its save time); None when a sync failed (recorded in the report)."""
    from grpo.data import PromptSampler
    from grpo.loop.run import checkpoint_meta
    from grpo.loop.train import run_step, train_source
    from grpo.rollout.vllm_engine import SyncError
    from grpo.runtime import checkpoint as ckpt
    from grpo.runtime.weights import model_checksum

    engine, rank = run.policy, run.rank
    zero3 = engine.zero_optimization_stage() == 3
    run_dir = Path(cfg.output_dir)
    source = train_source(cfg, run, PromptSampler(len(run.prompts.rows), cfg.seed), asynchronous=False)
    recs, sums, save_s, saved = [], [], 0.0, None
    try:
        for step in (1, 2):
            recs.append(run_step(cfg, run, source, step, run_dir))
            sums.append(model_checksum(engine.module, zero3))
            if step == 1:
                t0 = time.perf_counter()
                saved = ckpt.save(engine, run_dir / "checkpoints", 1,
                                  checkpoint_meta(cfg, 1, source.sampler_state(), run.world, None), rank, 2)
                save_s = time.perf_counter() - t0
    except SyncError as e:
        report.add("training steps", FAIL, str(e), "the rollout engine lost the trainer's weights after an "
                   "update: report this table")
        return None
    return recs, sums, saved, save_s


def training_steps_check(recs: list[dict], sums: list[Checksum]) -> Check:
    """The two steps' figures; finite loss and gradient norm, and weights that step 2 changed."""
    from grpo.runtime.weights import checksums_match

    fig = "; ".join(
        f"step {r['step']}: {r['time/step']:.1f} s, {r['tokens_per_second']:.0f} tokens/s, reward "
        f"{r['reward/mean']:.3f}, loss {r['loss/pg']:.3g}, grad norm {r['grad_norm']:.3g}"
        + (f", sync {r['time/sync']:.1f} s" if "sync/canary_mean_abs" in r else "") for r in recs)
    bad = [f"step {r['step']}: non-finite {k}" for r in recs for k in ("loss/pg", "grad_norm")
           if not math.isfinite(r[k])]
    if checksums_match(sums[0], sums[1]):
        bad.append("the weights did not change in step 2")
    return Check("training steps", FAIL if bad else PASS, fig + ("; " + "; ".join(bad) if bad else ""),
                 "lower optim.lr, check the rewards (reward/*/errors) and model.dtype" if bad else "")


def memory_check(run: RunState, device: str, budget: float, predicted: Plan) -> Check:
    """The measured peak per device (the largest over the ranks) against the plan's prediction and the budget."""
    from grpo.runtime import collectives as coll
    from grpo.runtime.tracking import peak_memory_gib

    measured = coll.all_max([peak_memory_gib(run.device)])[0]
    over = measured > MEMORY_SLACK * predicted.peak_gib or measured > budget
    return Check("memory", FAIL if over else PASS,
                 f"measured peak {measured:.2f} GiB per device ({'torch allocator' if device == 'cuda' else 'RSS'})"
                 f", predicted {predicted.peak_gib:.2f} GiB ({measured / predicted.peak_gib - 1:+.0%}), "
                 f"budget {budget:.1f} GiB",
                 "grpo plan underestimates this recipe: leave headroom (smaller optim.micro_batch_size) and "
                 "report this table" if over else "")


def checkpoint_check(run: RunState, saved: Path, save_s: float, step1: Checksum) -> Check:
    """Step 1's checkpoint loaded back after step 2 changed the weights: their checksum must be `step1` again."""
    from grpo.runtime import checkpoint as ckpt
    from grpo.runtime import collectives as coll
    from grpo.runtime.weights import checksums_match, model_checksum

    engine, rank = run.policy, run.rank
    t0 = time.perf_counter()
    try:
        ckpt.load(engine, saved, rank, run.world)
    except Exception as e:  # noqa: BLE001 - DeepSpeed and torch raise many types for unreadable files
        return Check("checkpoint", FAIL, f"step 1 saved in {save_s:.1f} s; loading it failed: "
                     f"{type(e).__name__}: {e}", "check the output_dir's filesystem (space, permissions)")
    load_s = time.perf_counter() - t0
    back = model_checksum(engine.module, engine.zero_optimization_stage() == 3)
    ok = checksums_match(back, step1)
    size = coll.all_sum([_du(saved) if rank == 0 else 0.0])[0]
    return Check("checkpoint", PASS if ok else FAIL,
                 f"step 1 saved in {save_s:.1f} s ({size:.2f} GiB), loaded in {load_s:.1f} s after step 2: "
                 + ("weights restored exactly" if ok else f"weights differ: sum {back[0]!r} vs {step1[0]!r}"),
                 "" if ok else "the checkpoint does not restore the weights: report this table")


def doctor(recipe: str, overrides: list[str], memory_gib: float | None = None, keep: bool = False,
           as_json: bool = False) -> int:
    base = load_config(recipe, overrides)
    out = Path(base.output_dir) / "doctor"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and out.exists():
        shutil.rmtree(out)
    cfg = load_config(recipe, [*overrides, f"output_dir={out}", "log.wandb=false", "checkpoint.resume=never"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from grpo.runtime.deepspeed_setup import pick_device

    report = Report(f"grpo doctor {recipe} {' '.join(overrides)}".rstrip() + f" ({world} rank(s) on "
                    f"{pick_device(cfg.device)}, rollout {cfg.rollout.engine}, ZeRO-{cfg.deepspeed.zero_stage})")
    try:
        run_checks(cfg, memory_gib, report)
    except Exception as e:  # noqa: BLE001 - whatever broke is the finding: name it in the table
        report.add(next((n for n in CHECKS if n not in {c.name for c in report.checks}), "doctor"), FAIL,
                   f"{type(e).__name__}: {e}", "report this table with the traceback above")
        import traceback

        traceback.print_exc()
    report.skip_rest(CHECKS)
    if rank == 0:
        print(json.dumps([asdict(c) for c in report.checks], indent=1) if as_json else report.table(), flush=True)
        if not keep and out.exists():
            shutil.rmtree(out, ignore_errors=True)
    return 0 if report.ok else 1
