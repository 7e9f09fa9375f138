"""Worker for tests/integration/test_zero_multiprocess.py::test_zero3_logprobs_with_uneven_chunks (run by torchrun): two
ZeRO-3 ranks compute completion logprobs with a 4-token vocabulary chunk, rank 0 on one short completion (1 chunk) and
rank 1 on two long ones (15 chunks), then back-propagate and step, twice. Each rank then checks the values and the
global gradient norm against the plain computation on an unsharded copy of the model, which it can do alone since both
ranks' sequences are fixed: DeepSpeed averages the ranks' gradients, so the reference is the mean of the two ranks'
losses."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs, reference_logprobs  # noqa: E402
from grpo.config import load_config  # noqa: E402
from grpo.runtime.deepspeed_setup import ds_config, init_distributed  # noqa: E402
from grpo.runtime.model import load_model  # noqa: E402

CHUNK = 4


def sequences(rank: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(rank)
    prompt = torch.randint(3, 200, (5,), generator=gen).tolist()
    lengths = [3] if rank == 0 else [29, 30]
    return [Sequence(prompt, torch.randint(3, 200, (n,), generator=gen).tolist()) for n in lengths]


def loss_of(lp: torch.Tensor, rank: int) -> torch.Tensor:
    weights = torch.linspace(-1.0, 2.0, lp.numel()) * (1 + rank)
    return (lp * weights).mean()


def main(model_dir: str, recipe: str) -> None:
    init_distributed("cpu")
    rank = dist.get_rank()
    cfg = load_config(recipe, ["model.path=" + model_dir, "deepspeed.zero_stage=3", "optim.max_grad_norm=1e9"])
    model = load_model(model_dir, "float32")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds_config(cfg, 2, 1))
    plain = load_model(model_dir, "float32")
    seqs = sequences(rank)
    # the reference gradient norm of the first step: mean over ranks of d(loss_r)/dW, on an unsharded copy
    plain.zero_grad()
    for r in (0, 1):
        (loss_of(torch.cat(reference_logprobs(plain, sequences(r))), r) / 2).backward()
    ref_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in plain.parameters() if p.grad is not None))
    with torch.no_grad():
        ref_lp = torch.cat(reference_logprobs(plain, seqs))
    for step in range(2):
        lp, ent = completion_logprobs(engine.module, build_micro_batch(seqs, 0, "prefix"), 1.0, chunk_size=CHUNK)
        assert lp.shape == ent.shape == (sum(len(s.completion_ids) for s in seqs),)
        if step == 0:
            err = (lp.detach() - ref_lp).abs().max().item()
            assert err < 1e-4, f"rank {rank}: logprobs differ from the plain computation by {err}"
        engine.backward(loss_of(lp, rank))
        engine.step()
        if step == 0:
            norm = float(engine.get_global_grad_norm())
            assert abs(norm - ref_norm.item()) < 1e-4 * ref_norm.item(), (norm, ref_norm.item())
            print(f"rank {rank} grad norm {norm:.6f} reference {ref_norm.item():.6f}", flush=True)
    with torch.no_grad():  # a no-grad pass (the old and reference logprobs of a step) with the same uneven chunks
        completion_logprobs(engine.module, build_micro_batch(seqs, 0, "prefix"), 1.0, chunk_size=CHUNK)
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    print(f"rank {rank} done, ranks {int(t.item())}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
