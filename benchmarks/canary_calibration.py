"""Calibrates the weight-sync canary: how far vLLM's probe logprobs sit from the trainer's when the sync is healthy,
and when it is broken, per dtype. The defaults in `grpo.rollout.vllm_engine.CANARY_TOLERANCE` come from its figures.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/canary_calibration.py --dtype bfloat16

Healthy: the engine loaded from the same weights as the trainer, three probes (the probe the trainer builds: a
prompt and a fixed answer). Broken: one layer's MLP loaded from the next layer (a wrong name mapping), and one layer's
MLP scaled by 2% (a small corruption the checksum catches; the canary only in float32). Reference: the trainer's own
rounding at the dtype on this CPU (its forward against a float64 one for float32, a float32 one for bfloat16), the
scale a healthy sync's difference is read against. Prints one JSON line: {case: [mean_abs, max_abs]}.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = ["What is 17 * 23? Answer with a number.", "Solve: 3 + 5 * 2 - 7 =", "Compute 144 / 12 + 9."]


def measure(model_dir: str, dtype: str) -> dict[str, tuple[float, float]]:
    from grpo.config import load_config
    from grpo.rollout.vllm_engine import (
        build_llm,
        canary_diff,
        finish_sync,
        llm_kwargs,
        load_weights,
        probe_ids,
        probe_logprobs_vllm,
        trainer_probe_logprobs,
    )
    from grpo.runtime.model import load_model, load_tokenizer

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "recipes", "smollm2-135m-arith.yaml"),
                      [f"model.dtype={dtype}", "rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.25"])
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype)
    llm = build_llm(llm_kwargs(cfg, model_dir, "cpu", 0, True))

    def diff(ids: list[int]) -> tuple[float, float]:
        return canary_diff(probe_logprobs_vllm(llm, ids), trainer_probe_logprobs(model, ids))

    wide = load_model(model_dir, "float32")
    if dtype == "float32":
        wide = wide.double()
    out = {}
    for i, q in enumerate(PROMPTS):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        ids = probe_ids(tok, prompt)
        out[f"healthy_{i}"] = diff(ids)
        # the trainer's own rounding at this dtype on this CPU: its forward against a wider one, same weights
        out[f"trainer_rounding_{i}"] = canary_diff(trainer_probe_logprobs(model, ids),
                                                   trainer_probe_logprobs(wide, ids))
    del wide
    params = dict(model.named_parameters())
    load_weights(llm, [(n.replace("layers.4.", "layers.3."), t.detach()) for n, t in params.items()
                       if ".layers.4.mlp." in n])
    finish_sync(llm, ids)
    out["broken_mlp_from_next_layer"] = diff(ids)
    load_weights(llm, [(n, t.detach() * 1.02) for n, t in params.items() if ".layers.3.mlp." in n])
    finish_sync(llm, ids)
    out["broken_mlp_scaled_2pct"] = diff(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default=None, help="an HF folder (default: the embedded SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    if args.model is None:
        from grpo.runtime.model import embedded_model_dir

        args.model = str(embedded_model_dir())
    print(json.dumps({"dtype": args.dtype, **measure(args.model, args.dtype)}))


if __name__ == "__main__":
    main()
