"""Worker for tests/integration/test_precision.py::test_two_ranks_average_bf16_gradient_sums_in_fp32 (run by torchrun):
a bf16 model on two ranks under BF16_Optimizer (every bf16 recipe), two micro-batches a step, different data per rank.
At the step's all-reduce each rank records its fp32 gradient sums, gathers both ranks' (all_gather: a different
collective from the one under test) and checks that the averaged sums are their exact fp32 mean. DeepSpeed's default
casts them to bf16 for the all-reduce, which is off by up to 2^-9 of each value."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grpo.config import load_config  # noqa: E402
from grpo.runtime.deepspeed_setup import build_policy_engine, init_distributed  # noqa: E402
from grpo.runtime.model import load_model  # noqa: E402


def main(model_dir: str, recipe: str) -> None:
    init_distributed("cpu")
    rank = dist.get_rank()
    cfg = load_config(recipe, ["model.path=" + model_dir, "model.dtype=bfloat16", "deepspeed.zero_stage=0",
                               "optim.max_grad_norm=1e9"])
    engine = build_policy_engine(load_model(model_dir, "bfloat16"), cfg, 1, 2)
    print(f"rank {rank} optimizer {type(engine.optimizer).__name__}", flush=True)
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    reduce = engine.allreduce_gradients

    def spy(*args, **kwargs):  # called every micro-batch; it averages at the step's boundary only
        if not engine.is_gradient_accumulation_boundary():
            return reduce(*args, **kwargs)
        sums = engine.optimizer.get_grads_for_reduction()[0]
        before = [t.detach().clone() for t in sums]
        reduce(*args, **kwargs)
        seen.append((before, [t.detach().clone() for t in sums]))

    engine.allreduce_gradients = spy
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):  # one step of two micro-batches
        ids = torch.randint(3, 200, (1, 12), generator=gen)
        engine.backward(engine(ids).logits.float().square().mean())
        engine.step()
    assert len(seen) == 1, f"rank {rank}: {len(seen)} all-reduces in a step of two micro-batches"
    before, after = seen[0]
    worst = 0.0
    for mine, reduced in zip(before, after, strict=True):
        assert mine.dtype == torch.float32 and not torch.equal(mine, mine.bfloat16().float()), "sums hold fp32 bits"
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine)
        assert not torch.equal(both[0], both[1]), "the ranks' gradients should differ"
        mean = (both[0] + both[1]) / 2
        worst = max(worst, ((reduced - mean).abs().max() / mean.abs().max()).item())
    print(f"rank {rank} worst relative error {worst:.3e}", flush=True)
    assert worst < 1e-6, f"rank {rank}: averaged gradient sums off the fp32 mean by {worst:.3e}"
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
