"""Side by side with TRL's GRPOTrainer, in the same run on the same machine: step time, time per phase, tokens per
second and peak memory, for the same model, prompts, group size, generation length and optimizer settings.

    .venv/bin/python benchmarks/compare_trl.py [--steps 6] [--json out.json]
    python benchmarks/compare_trl.py --device cuda --dtype bfloat16 --max-new 256     # on a GPU machine

Each trainer runs in its own process (so each peak memory is its own), one after the other. Both generate with
HF transformers (TRL with use_vllm=False; ours with the HF engine), 8 prompts x 8 completions a step, at most
`--max-new` (16) new tokens, temperature 1, AdamW lr 3e-5, 2 warm-up steps, grad clip 1.0, micro-batches of 16
sequences, beta = 0, token-level loss (TRL's "dapo"), clip 0.2/0.28, one pass per batch. The first step of each
is a warm-up and is left out of the medians. TRL's generation phase includes its scoring and its old-logprob
forward (it does them in one method); its update is the rest of the step. Peak memory is the process's peak RSS
on CPU and the peak CUDA memory allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
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
PROMPTS, G, LR, MICRO = 8, 8, 3e-5, 16


def run_ours(steps: int, device: str, dtype: str, max_new: int, model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"output_dir={tmp}/run", f"steps={steps}", "eval.at_start=false", "eval.at_end=false", "eval.every=0",
                "checkpoint.every=0", "checkpoint.save_final_model=false", f"rollout.prompts_per_step={PROMPTS}",
                f"rollout.num_generations={G}", f"rollout.max_new_tokens={max_new}", f"optim.lr={LR}",
                f"optim.micro_batch_size={MICRO}", "scoring.workers=0", f"device={device}", f"model.dtype={dtype}"]
        if model:
            args.append(f"model.path={model}")
        env = {**os.environ, "DS_ACCELERATOR": device, "WANDB_MODE": "disabled"}
        p = subprocess.run([sys.executable, "-m", "grpo", "train", str(RECIPE), *args], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        m = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    m = [r for r in m if "time/step" in r][1:]  # first step: warm-up
    med = lambda k: statistics.median(r.get(k, 0.0) for r in m)  # noqa: E731
    return {"step_s": med("time/step"), "generate_s": med("time/generate"), "score_s": med("time/score"),
            "update_s": med("time/update") + med("time/logprobs"), "sync_s": med("time/sync"),
            "tokens_per_s": med("tokens_per_second"), "peak_gib": max(r["memory/peak_gib"] for r in m),
            "reward_mean": statistics.mean(r["reward/mean"] for r in m)}


def trl_child(steps: int, device: str, dtype: str, max_new: int, model: str) -> None:
    """Runs inside its own process: TRL's GRPOTrainer on the same data, prints one JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.config import load_config
    from grpo.data import load_rows
    from grpo.runtime.model import embedded_model_dir, load_tokenizer
    from rewards.math import accuracy

    cfg = load_config(RECIPE)
    train_rows, _ = load_rows(cfg.data)
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": cfg.data.system_prompt},
                                        {"role": "user", "content": r["question"]}], "answer": r["answer"]}
                            for r in train_rows])
    path = model or str(embedded_model_dir())
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

    def accuracy_reward(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return accuracy(texts, answer)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=PROMPTS * G // MICRO, num_generations=G,
                      max_completion_length=max_new, temperature=1.0, learning_rate=LR, warmup_steps=2,
                      lr_scheduler_type="constant_with_warmup", max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                      epsilon=0.2, epsilon_high=0.28, num_iterations=1, use_vllm=False, bf16=dtype == "bfloat16",
                      use_cpu=device == "cpu",
                      logging_steps=1, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=args, train_dataset=ds,
                          processing_class=tok)
    gen_times: list[float] = []
    inner = trainer._generate_and_score_completions

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed
    step_times: list[float] = []
    gen_at_step: list[float] = []
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.g0 = time.perf_counter(), sum(gen_times)

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)
            gen_at_step.append(sum(gen_times) - self.g0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    trainer.add_callback(Clock())
    trainer.train()
    s, g = step_times[1:], gen_at_step[1:]
    print(json.dumps({"step_s": statistics.median(s), "generate_s": statistics.median(g),
                      "update_s": statistics.median(a - b for a, b in zip(s, g, strict=True)),
                      "tokens_per_s": None,
                      "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
                      "reward_mean": statistics.mean(rewards[1:]) if len(rewards) > 1 else None}))


def run_trl(steps: int, device: str, dtype: str, max_new: int, model: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    p = subprocess.run([sys.executable, __file__, "--child-trl", "--steps", str(steps), "--device", device,
                        "--dtype", dtype, "--max-new", str(max_new), "--model", model], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--model", default="", help="an HF folder for both trainers (default: the embedded "
                                                "SmolLM2-135M-Instruct; the tests smoke-run a tiny one)")
    ap.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setting = (args.steps, args.device, args.dtype, args.max_new, args.model)
    if args.child_trl:
        trl_child(*setting)
        return
    ours = run_ours(*setting)
    trl = run_trl(*setting)
    report(ours, trl, ("step_s", "generate_s", "update_s", "peak_gib", "reward_mean"), args.json)
    print(f"(ours also: score {ours['score_s']:.2f}s, sync {ours['sync_s']:.3f}s, "
          f"{ours['tokens_per_s']:.1f} generated tokens/s; TRL's generate includes its scoring)")


if __name__ == "__main__":
    main()
