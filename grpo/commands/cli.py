"""`grpo COMMAND RECIPE.yaml [dotted.key=value ...]` (also `python -m grpo`).

Multi-process: `torchrun --nproc_per_node N -m grpo train ...` or `deepspeed --num_gpus N -m grpo ...`.
Server mode: `grpo serve RECIPE --port 8000` on the generation GPUs/nodes, then
`grpo train RECIPE rollout.engine=vllm_server rollout.vllm.servers=[http://HOST:8000]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from grpo.config import ConfigError, load_config

RECIPE = ("recipe", {"help": "path to a recipe YAML (see recipes/)"})
OVERRIDES = ("overrides", {"nargs": "*", "help": "dotted.key=value overrides, e.g. rollout.num_generations=16"})


def _train(a) -> int:
    from grpo.loop.train import train

    print(f"run directory: {train(load_config(a.recipe, a.overrides))}")
    return 0


def _sft(a) -> int:
    from grpo.loop.sft import sft

    print(f"run directory: {sft(load_config(a.recipe, a.overrides))}")
    return 0


def _distill(a) -> int:
    from grpo.loop.distill import distill

    print(f"data set: {distill(load_config(a.recipe, a.overrides))}")
    return 0


def _eval(a) -> int:
    from grpo.loop.train import evaluate_only

    ev = evaluate_only(load_config(a.recipe, [f"model.path={a.model}", *a.overrides]))
    print(" ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    return 0


def _inspect(a) -> int:
    from grpo.commands.inspect import inspect_run

    return inspect_run(a.run_dir, a.step, a.prompt, a.top)


def _check_rewards(a) -> int:
    from rewards.check import main

    return main(a.recipe, a.cases, a.overrides)


def _serve(a) -> int:
    from grpo.commands.serve import serve

    # a server is server mode whatever the recipe's engine says (rollout.async and friends validate against it)
    serve(load_config(a.recipe, [*a.overrides, "rollout.engine=vllm_server"]), a.host, a.port, a.ready_file)
    return 0


def _plan(a) -> int:
    from grpo.commands.plan import main

    return main(a.recipe, a.overrides, a.gpus, a.gpu_memory, a.device, a.json, a.phase)


def _doctor(a) -> int:
    from grpo.commands.doctor import doctor

    return doctor(a.recipe, a.overrides, a.memory, a.keep, a.json)


def _prepare_model(a) -> int:
    from grpo.runtime.model import embedded_model_dir

    print(embedded_model_dir())
    return 0


@dataclass
class Command:
    run: Callable[[argparse.Namespace], int]
    help: str
    args: tuple = ()  # (name, argparse keywords) pairs


COMMANDS = {
    "train": Command(_train, "train a policy with GRPO from a recipe", (RECIPE, OVERRIDES)),
    "sft": Command(_sft, "supervised fine-tuning on prompt/completion or conversational data (sft.data)",
                   (RECIPE, OVERRIDES)),
    "distill": Command(_distill, "sample a teacher on the recipe's prompts, keep the verified samples as an SFT "
                       "data set", (RECIPE, OVERRIDES)),
    "eval": Command(_eval, "evaluate a model on a recipe's held-out split (greedy, or pass@k)", (
        RECIPE, ("model", {"help": "HF model folder, e.g. a run's final/"}), OVERRIDES)),
    "inspect": Command(_inspect, "summarise a run directory: curves, worst/best groups, a prompt's group", (
        ("run_dir", {}),
        ("--step", {"type": int, "default": None, "help": "step to show groups of (default: the last)"}),
        ("--prompt", {"default": None, "help": "show only this prompt id's group"}),
        ("--top", {"type": int, "default": 3, "help": "how many worst and best groups"}))),
    "check-rewards": Command(_check_rewards, "score labelled cases with a recipe's rewards, report disagreements", (
        RECIPE, ("cases", {"help": "JSONL: completion, row columns, expected scores per reward"}), OVERRIDES)),
    "serve": Command(_serve, "start a vLLM generation server for a recipe's model (server mode)", (
        RECIPE, OVERRIDES,
        ("--host", {"default": "0.0.0.0", "help": "address to listen on (default: all)"}),
        ("--port", {"type": int, "default": 8000, "help": "HTTP port (0: any free port)"}),
        ("--ready-file", {"default": None, "help": "append this server's URL to the file once it is ready"}))),
    "plan": Command(_plan, "predict peak memory per GPU for a recipe, and whether it fits", (
        RECIPE, OVERRIDES,
        ("--gpus", {"type": int, "default": 1, "help": "GPUs (training ranks) the run uses"}),
        ("--gpu-memory", {"type": float, "default": None, "help": "GiB per GPU (e.g. 24, 80)"}),
        ("--device", {"choices": ("cuda", "cpu"), "default": "cuda"}),
        ("--phase", {"choices": ("grpo", "sft"), "default": "grpo",
                     "help": "the command to plan: grpo train (default) or grpo sft (no rollouts)"}),
        ("--json", {"action": "store_true"}))),
    "doctor": Command(_doctor, "exercise every path a recipe uses (devices, collectives, rollout engine and sync, "
                      "two training steps, memory, checkpoint) in minutes; a table and a verdict", (
        RECIPE, OVERRIDES,
        ("--memory", {"type": float, "default": None, "help": "GiB per device to plan against (default: the "
                      "device's total on GPU, available RAM per process on CPU)"}),
        ("--keep", {"action": "store_true", "help": "keep OUTPUT_DIR/doctor (checkpoint, rollouts)"}),
        ("--json", {"action": "store_true", "help": "print the checks as JSON instead of the table"}))),
    "prepare-model": Command(_prepare_model, "convert the embedded SmolLM2-135M GGUF into a cached HF folder", (
        ("--print-path", {"action": "store_true"}),)),
}


def exit_code(e: BaseException) -> tuple[int, str] | None:
    """The one mapping from the errors a user can cause to exit codes: 2 for bad input (the message names the key
    or file), 85 for a preemption after its checkpoint (slurm requeues), 1 for an unusable checkpoint or a
    failing teacher."""
    if isinstance(e, ConfigError):
        return 2, "error: "
    from grpo.loop.run import PREEMPTED_EXIT, Preempted
    from grpo.runtime.checkpoint import CheckpointError  # only train and eval raise these: imported once one is raised

    if isinstance(e, Preempted):
        return PREEMPTED_EXIT, ""
    from grpo.loop.distill import TeacherError

    if isinstance(e, (CheckpointError, TeacherError)):
        return 1, "error: "
    return None


def configure_logging() -> None:
    """Rank 0 logs at INFO; the other ranks only warn and err, each line prefixed with its rank (a 16-rank job
    would otherwise print every line 16 times)."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help)
        for arg, kw in cmd.args:
            p.add_argument(arg, **kw)
    args = parser.parse_args(argv)
    configure_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command].run(args)
    except Exception as e:
        known = exit_code(e)
        if known is None:
            raise
        print(f"grpo {args.command}: {known[1]}{e}", file=sys.stderr)
        return known[0]
