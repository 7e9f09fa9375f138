"""Resumable checkpoints, published atomically.

Layout: `output_dir/checkpoints/step-000012/` holds DeepSpeed's state (model, optimizer, scheduler, per ZeRO
rank) under `state/`, our `meta.json` (step, data position, run ids, world size, config) and one RNG file per
rank. It is written under `.staging-000012` and renamed once every rank finished and `COMPLETE` was written
last, so a crash mid-save never leaves a half checkpoint under a final name. The newest `keep` are kept.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo.config import ConfigError
from grpo.runtime import collectives as coll
from grpo.runtime import lora

log = logging.getLogger("grpo.checkpoint")  # the name its lines have always carried
_STEP_DIR = re.compile(r"step-(\d+)$")
MARKER = "COMPLETE"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def save(engine, root: Path, step: int, meta: dict[str, Any], rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the published directory."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{step:06d}"
    final = root / f"step-{step:06d}"
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)
    coll.barrier()
    error: BaseException | str | None = None
    try:
        # LoRA: the adapters and their optimizer state; the frozen base is model.path
        engine.save_checkpoint(str(staging), tag="state", exclude_frozen_parameters=lora.active(engine.module))
        torch.save(rng_state(), staging / f"rng-rank{rank}.pt")
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, depending on the writer
        error = e
    if not coll.any_rank(error is not None) and rank == 0:
        try:
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            (staging / MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        except OSError as e:
            error = e
    if coll.any_rank(error is not None):
        # Nothing half-written stays behind (its space is given back), and older checkpoints are untouched.
        # torch.save reports a full disk cryptically ("unexpected pos ..."): say so when the disk is full.
        free = shutil.disk_usage(root).free
        if free < 64 * 2**20 or (isinstance(error, OSError) and error.errno == 28):
            error = f"{error} -- the file system is full ({free / 2**20:.0f} MiB free)"
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        coll.barrier()
        previous = complete_checkpoints(root)
        raise CheckpointError(f"could not write the checkpoint of step {step} under {root}: "
                              f"{error if error is not None else 'failed on another rank'}. "
                              + (f"The last complete checkpoint, {previous[0].name}, is intact: "
                                 "free space and run the same command again to resume from it."
                                 if previous else "No earlier checkpoint exists."))
    if rank == 0:
        for old in complete_checkpoints(root)[max(1, keep) :]:
            shutil.rmtree(old, ignore_errors=True)
    coll.barrier()
    return final


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, permissions); earlier ones are untouched."""


def explicit_checkpoint(path: str) -> Path:
    """`checkpoint.resume: PATH`: it must be complete (a missing meta.json means no data position: refuse)."""
    p = Path(path)
    if not ((p / MARKER).is_file() and (p / "meta.json").is_file()):
        raise ConfigError(f"checkpoint.resume: {p} is not a complete checkpoint (no {MARKER} or meta.json)")
    return p


# What a resumed run must share with the run that wrote the checkpoint, or the data stream and the batches misalign.
MUST_MATCH = ("seed", "model.path", "rollout.prompts_per_step", "rollout.num_generations", "data", "sft.data",
              "sft.batch_size")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


# The learning rate a resumed run follows comes from the checkpoint: the scheduler's state holds the base LR and the
# step count, the schedule's shape comes from these keys. A changed optim.lr would be silently ignored; with a
# decaying schedule, a changed horizon (steps, warm-up, passes) would make the LR jump.
SCHEDULE_KEYS = ("optim.lr", "optim.schedule", "optim.warmup_steps")
HORIZON_KEYS = ("steps", "algo.num_iterations")


def _has(d: dict[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _with_defaults(saved: Any, defaults: Any) -> Any:
    """The saved config with every key added since it was written filled in with today's default: a run written
    before `data.few_shot` existed ran without examples, which is what the default means."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    from grpo.config import Config

    # a section the saved config does not have was added since (sft.*): nothing to compare it with; a key added to
    # a section it has compares as the key's default
    defaults = Config.model_construct().model_dump(by_alias=True, warnings=False)
    saved = {k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}
    changed = [k for k in MUST_MATCH if _has(saved, k) and _get(saved, k) != _get(current, k)]
    if changed:
        raise ConfigError(f"checkpoint {path} was written with a different {', '.join(changed)} "
                           f"({[_get(saved, k) for k in changed]} -> {[_get(current, k) for k in changed]}); "
                           "resuming would misalign the data or the batches: use a new output_dir, or "
                           "checkpoint.resume=never to start over")
    saved_lora, lora_now = _get(saved, "model.lora"), _get(current, "model.lora")
    if _has(saved, "model.lora") and saved_lora != lora_now:
        keys = sorted(k for k in set(saved_lora) | set(lora_now) if saved_lora.get(k) != lora_now.get(k))
        raise ConfigError(f"checkpoint {path} was written with a different model.lora "
                          + ", ".join(f"{k}: {saved_lora.get(k)} -> {lora_now.get(k)}" for k in keys)
                          + "; its adapters were trained for that set-up (a LoRA checkpoint loads non-strictly, so "
                          "the change would go unnoticed): use a new output_dir, or checkpoint.resume=never")
    decaying = "constant" not in (_get(saved, "optim.schedule"), _get(current, "optim.schedule"))
    changed = [k for k in SCHEDULE_KEYS + (HORIZON_KEYS if decaying else ()) if _get(saved, k) != _get(current, k)]
    if changed:
        raise ConfigError(f"checkpoint {path} was written with a different {', '.join(changed)} "
                          f"({[_get(saved, k) for k in changed]} -> {[_get(current, k) for k in changed]}): the "
                          "learning-rate schedule is restored from the checkpoint, so the change would be ignored or "
                          "make the LR jump; use a new output_dir (with model.path set to a final/ model), or "
                          "checkpoint.resume=never. With optim.schedule=constant, steps may grow.")


def load_latest(engine, root: Path, resume: str, rank: int, world_size: int,
                config: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint every rank can read; a damaged one is skipped with a warning and the previous
    one is tried. Collective: the ranks agree on each candidate, so they never resume from different steps."""
    if resume == "never":
        return None
    candidates = [explicit_checkpoint(resume)] if resume != "auto" else complete_checkpoints(root)
    errors = []
    for path in candidates:
        try:
            meta = json.loads((path / "meta.json").read_text())
            check_compatible(meta.get("config", {}), config, path)
        except ConfigError:  # a changed configuration is refused, not skipped
            raise
        except (OSError, ValueError) as e:
            meta, errors = None, errors + [f"{path}: {e}"]
        ok = meta is not None
        if meta is not None:
            try:
                meta = load(engine, path, rank, world_size)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - torch/DeepSpeed raise many types for a damaged file
                ok, errors = False, errors + [f"{path}: {type(e).__name__}: {e}"]
        if coll.every_rank(ok):
            return path, meta
        log.warning("checkpoint %s could not be loaded on every rank; trying the previous one (%s)", path,
                    errors[-1] if errors else "another rank failed")
    if candidates:
        raise RuntimeError("no checkpoint could be loaded: " + "; ".join(errors))
    return None


def load(engine, path: Path, rank: int, world_size: int) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                           f"{world_size}: ZeRO states do not reshard without conversion (DeepSpeed's universal "
                           "checkpoint); resume with the same number of processes")
    load_path, _ = engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True,
                                          load_module_strict=not lora.active(engine.module))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path}/state")
    set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=False))
    return meta
