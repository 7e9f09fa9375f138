"""`grpo sft` side by side with TRL's SFTTrainer, in the same run on the same machine: tokens per second and peak
memory, for the same model (the embedded SmolLM2-135M), data, batch and optimizer settings.

    .venv/bin/python benchmarks/compare_trl_sft.py [--steps 6] [--rows 256] [--no-gradient-checkpointing]
    python benchmarks/compare_trl_sft.py --device cuda --dtype bfloat16          # on a GPU machine

The data: the default task's training prompts (TRL's conversational prompt/completion format), each answered by a
worked completion of 20-40 tokens. Both train on the completion tokens only, batches of 32 sequences in micro-
batches of 8, AdamW lr 2e-5 (betas 0.9/0.999, no warm-up, constant), grad clip 1.0, and the same gradient
checkpointing setting (on by default, as in TRL's SFTConfig; `--no-gradient-checkpointing` turns it off for both);
TRL with its defaults otherwise (padding to the longest in the micro-batch; its `padding_free` needs flash-
attention). Each trainer runs in its own process (each peak memory is its own), one after the other; the first step
is a warm-up, left out of the medians. Tokens per second count the same tokens for both (prompt and completion
tokens of the step's sequences, no padding) over the step's time. Peak memory is the process's peak RSS on CPU, the
peak CUDA memory allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import report  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2-135m-arith.yaml"
BATCH, MICRO, LR = 32, 8, 2e-5


def write_data(path: Path, rows: int) -> None:
    """Prompt/completion rows: the task's prompts, completions that show the sum being worked out."""
    from grpo.config import load_config
    from grpo.data import load_rows

    cfg = load_config(RECIPE, [f"data.num_train={rows}"])
    rng = random.Random(0)
    with path.open("w") as f:
        for r in load_rows(cfg.data)[0][:rows]:
            steps = " ".join(f"Step {i + 1}: keep going." for i in range(rng.randint(1, 5)))
            f.write(json.dumps({"prompt": [{"role": "system", "content": cfg.data.system_prompt},
                                           {"role": "user", "content": r["question"]}],
                                "completion": [{"role": "assistant",
                                                "content": f"{steps} The answer is {r['answer']}."}]}) + "\n")


def step_tokens(data: Path, model: str) -> list[int]:
    """Prompt + completion tokens per row, as both trainers tokenize them (the chat template)."""
    from grpo.config import load_config
    from grpo.loop.sft import load_examples
    from grpo.runtime.model import load_tokenizer, resolve_model_path

    cfg = load_config(RECIPE, [f"sft.data={data}"])
    tok = load_tokenizer(model or resolve_model_path(cfg.model.path))
    return [len(e.prompt_ids) + len(e.completion_ids) for e in load_examples(cfg, tok)]


def run_ours(data: Path, steps: int, device: str, dtype: str, ckpt: bool, model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"output_dir={tmp}/run", f"sft.data={data}", f"sft.batch_size={BATCH}",
                f"optim.micro_batch_size={MICRO}", f"optim.lr={LR}", "checkpoint.every=0",
                "optim.warmup_steps=0", "optim.schedule=constant", "optim.betas=[0.9,0.999]",  # TRL's defaults
                "checkpoint.save_final_model=false", f"device={device}", f"model.dtype={dtype}",
                f"model.gradient_checkpointing={str(ckpt).lower()}",
                f"sft.epochs={steps * BATCH / len(step_tokens(data, model))}"]
        args += [f"model.path={model}"] if model else []
        env = {**os.environ, "DS_ACCELERATOR": device, "WANDB_MODE": "disabled"}
        p = subprocess.run([sys.executable, "-m", "grpo", "sft", str(RECIPE), *args], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        m = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": statistics.median(r["time/step"] for r in m),
            "tokens_per_s": statistics.median(r["tokens_per_second"] for r in m),
            "peak_gib": max(r["memory/peak_gib"] for r in m), "loss_last": m[-1]["loss"]}


def trl_child(data: Path, steps: int, device: str, dtype: str, ckpt: bool, model: str) -> None:
    """Runs inside its own process: TRL's SFTTrainer on the same rows, prints one JSON line."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from grpo.runtime.model import embedded_model_dir, load_tokenizer

    path = model or str(embedded_model_dir())
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=BATCH // MICRO, learning_rate=LR, lr_scheduler_type="constant",
                     max_grad_norm=1.0, bf16=dtype == "bfloat16", use_cpu=device == "cpu", logging_steps=1,
                     report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
                     completion_only_loss=True, max_length=512, gradient_checkpointing=ckpt)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Clock())
    trainer.train()
    print(json.dumps({"step_s": statistics.median(times[1:]), "loss_last": losses[-1] if losses else None,
                      "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)}))


def run_trl(data: Path, steps: int, device: str, dtype: str, ckpt: bool, model: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, __file__, "--child-trl", str(data), "--steps", str(steps), "--device", device,
           "--dtype", dtype, "--model", model] + ([] if ckpt else ["--no-gradient-checkpointing"])
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--no-gradient-checkpointing", dest="ckpt", action="store_false",
                    help="both trainers without gradient checkpointing (TRL's SFTConfig turns it on by default)")
    ap.add_argument("--model", default="", help="an HF folder for both trainers (default: the embedded "
                    "SmolLM2-135M-Instruct; the tests smoke-run a tiny one)")
    ap.add_argument("--child-trl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_trl:
        trl_child(Path(args.child_trl), args.steps, args.device, args.dtype, args.ckpt, args.model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.jsonl"
        write_data(data, args.rows)
        lengths = step_tokens(data, args.model)
        ours = run_ours(data, args.steps, args.device, args.dtype, args.ckpt, args.model)
        trl = run_trl(data, args.steps, args.device, args.dtype, args.ckpt, args.model)
    trl["tokens_per_s"] = statistics.mean(lengths) * BATCH / trl["step_s"]  # the same tokens per step as ours
    report(ours, trl, ("step_s", "tokens_per_s", "peak_gib", "loss_last"), args.json)
    print(f"({len(lengths)} rows, {statistics.mean(lengths):.1f} tokens each on average; batches of {BATCH}, "
          f"micro-batches of {MICRO}; gradient checkpointing {'on' if args.ckpt else 'off'} for both)")


if __name__ == "__main__":
    main()
