"""`grpo train RECIPE.yaml [dotted.key=value ...]` (also `python -m grpo`).

Multi-process: `torchrun --nproc_per_node N -m grpo train ...` or `deepspeed --num_gpus N -m grpo ...`.
Server mode: `grpo serve RECIPE --port 8000` on the generation GPUs/nodes, then
`grpo train RECIPE rollout.engine=vllm_server rollout.vllm.servers=[http://HOST:8000]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpo.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy with GRPO from a recipe")
    t.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rollout.num_generations=16")
    e = sub.add_parser("eval", help="evaluate a model on a recipe's held-out split (greedy, or pass@k)")
    e.add_argument("recipe")
    e.add_argument("model", help="HF model folder, e.g. a run's final/")
    e.add_argument("overrides", nargs="*")
    i = sub.add_parser("inspect", help="summarise a run directory: curves, worst/best groups, a prompt's group")
    i.add_argument("run_dir")
    i.add_argument("--step", type=int, default=None, help="step to show groups of (default: the last)")
    i.add_argument("--prompt", default=None, help="show only this prompt id's group")
    i.add_argument("--top", type=int, default=3, help="how many worst and best groups")
    c = sub.add_parser("check-rewards", help="score labelled cases with a recipe's rewards, report disagreements")
    c.add_argument("recipe")
    c.add_argument("cases", help="JSONL: completion, row columns, expected scores per reward")
    c.add_argument("overrides", nargs="*")
    v = sub.add_parser("serve", help="start a vLLM generation server for a recipe's model (server mode)")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    v.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    v.add_argument("--ready-file", default=None, help="append this server's URL to the file once it is ready")
    pl = sub.add_parser("plan", help="predict peak memory per GPU for a recipe, and whether it fits")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (training ranks) the run uses")
    pl.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (e.g. 24, 80)")
    pl.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    pl.add_argument("--json", action="store_true")
    d = sub.add_parser("doctor", help="exercise every path a recipe uses (devices, collectives, rollout engine "
                       "and sync, two training steps, memory, checkpoint) in minutes; a table and a verdict")
    d.add_argument("recipe")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--memory", type=float, default=None, help="GiB per device to plan against (default: the "
                   "device's total on GPU, available RAM per process on CPU)")
    d.add_argument("--keep", action="store_true", help="keep OUTPUT_DIR/doctor (checkpoint, rollouts)")
    d.add_argument("--json", action="store_true", help="print the checks as JSON instead of the table")
    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M GGUF into a cached HF folder")
    p.add_argument("--print-path", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "inspect":
        from grpo.inspect_cli import inspect_run

        return inspect_run(args.run_dir, args.step, args.prompt, args.top)
    if args.command == "check-rewards":
        from rewards.check import main as check_main

        try:
            return check_main(args.recipe, args.cases, args.overrides)
        except (ConfigError, ValueError, OSError) as e:
            print(f"grpo check-rewards: error: {e}", file=sys.stderr)
            return 2
    if args.command == "serve":
        try:
            from grpo.serve import serve

            serve(load_config(args.recipe, args.overrides), args.host, args.port, args.ready_file)
        except ConfigError as e:
            print(f"grpo serve: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "plan":
        from grpo.plan import main as plan_main

        try:
            return plan_main(args.recipe, args.overrides, args.gpus, args.gpu_memory, args.device, args.json)
        except ConfigError as e:
            print(f"grpo plan: error: {e}", file=sys.stderr)
            return 2
    if args.command == "doctor":
        from grpo.doctor import doctor

        try:
            return doctor(args.recipe, args.overrides, args.memory, args.keep, args.json)
        except ConfigError as e:
            print(f"grpo doctor: error: {e}", file=sys.stderr)
            return 2
    if args.command == "prepare-model":
        from grpo.model import embedded_model_dir

        print(embedded_model_dir())
        return 0
    from grpo.checkpoint import CheckpointError
    from grpo.train import PREEMPTED_EXIT, Preempted

    if args.command == "eval":
        try:
            cfg = load_config(args.recipe, [f"model.path={args.model}", *args.overrides])
            from grpo.train import evaluate_only

            ev = evaluate_only(cfg)
        except ConfigError as e:
            print(f"grpo: error: {e}", file=sys.stderr)
            return 2
        print(" ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        return 0
    try:
        cfg = load_config(args.recipe, args.overrides)
        from grpo.train import train

        run_dir = train(cfg)
    except ConfigError as e:
        print(f"grpo: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"grpo: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except CheckpointError as e:
        print(f"grpo: error: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0
