"""Worker for tests/integration/test_zero_multiprocess.py::test_zero3_generation_with_ranks_stopping_apart (run by
torchrun): two ZeRO-3 ranks generate with the HF engine, rank 0's completions ending after 2 tokens and rank 1's after
24, then rank 0 has no prompts at all (a held-out split that does not divide), then both train one step."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grpo.config import load_config  # noqa: E402
from grpo.rollout.base import SamplingParams  # noqa: E402
from grpo.rollout.hf import HFEngine  # noqa: E402
from grpo.runtime.deepspeed_setup import ds_config, init_distributed  # noqa: E402
from grpo.runtime.model import load_model, load_tokenizer  # noqa: E402


def main(model_dir: str, recipe: str) -> None:
    init_distributed("cpu")
    rank = dist.get_rank()
    cfg = load_config(recipe, ["model.path=" + model_dir, "deepspeed.zero_stage=3"])
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "float32")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds_config(cfg, 2, 1))
    gen = HFEngine(engine.module, tok, batch_size=4, gather_zero3=True,
                   zero3_offload=getattr(engine.optimizer, "parameter_offload", None))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count to ten."}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    torch.manual_seed(rank)
    out = gen.generate([prompt], 2, SamplingParams(max_new_tokens=2 if rank == 0 else 24, temperature=1.0))
    print(f"rank {rank} lengths {[len(c.ids) for c in out[0]]}", flush=True)
    mine = [] if rank == 0 else [prompt]
    more = gen.generate(mine, 1, SamplingParams(max_new_tokens=5, temperature=1.0))
    assert len(more) == len(mine)
    ids = torch.tensor([prompt + out[0][0].ids])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    print(f"rank {rank} trained, ranks {int(t.item())}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
