"""Every collective of the training ranks, in one place, on the device the backend takes.

NCCL's default group takes CUDA tensors only: an all-reduce of a CPU tensor fails with "No backend type associated with
device type cpu" (gloo, on CPU, takes CPU tensors). So the small values the loop agrees on (sums of statistics, a stop
flag, a checkpoint verdict) are put on `backend_device()` before the collective and read back after it.
`tests/unit/runtime/test_collectives.py` checks that no other module calls a `torch.distributed` collective directly.
(The weight broadcast to vLLM servers runs on its own process group with its own device rules:
`grpo/rollout/transfer/`.)
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist


def backend_device() -> torch.device:
    """Where the default group's tensors must live: the rank's GPU under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(values: list[float], op: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64).to(backend_device())
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_max(values: list[float]) -> list[float]:
    """Element-wise maximum over the ranks."""
    return _reduce(values, dist.ReduceOp.MAX)


def sum_named(values: dict[str, float]) -> dict[str, float]:
    """Named statistics summed over the ranks, so no caller indexes a positional vector (`summed[5]`).

    The keys travel sorted with a CRC of their names appended: a rank holding other keys (a reward name built
    from data instead of the recipe) raises here instead of silently adding one statistic to another."""
    keys = sorted(values)
    tag = float(zlib.crc32("\0".join(keys).encode()))
    *sums, tags = all_sum([float(values[k]) for k in keys] + [tag])
    if tags != tag * dist.get_world_size():
        raise RuntimeError(f"ranks reduce different statistics (this rank: {', '.join(keys)})")
    return dict(zip(keys, sums, strict=True))


def max_named(values: dict[str, float]) -> dict[str, float]:
    """Named statistics, the maximum over the ranks (same keys on every rank)."""
    keys = sorted(values)
    return dict(zip(keys, all_max([float(values[k]) for k in keys]), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on any."""
    return all_max([1.0 if flag else 0.0])[0] > 0


def every_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on all of them."""
    return _reduce([1.0 if flag else 0.0], dist.ReduceOp.MIN)[0] > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    dist.barrier()


def timed_all_reduce(nbytes: int, repeats: int = 5) -> tuple[float, bool]:
    """Seconds per all-reduce of an fp32 tensor of `nbytes` on the backend's device (the best of `repeats`, after
    one warm-up), and whether the sums were right (rank r contributes r + 1). For `grpo doctor`."""
    import time

    world = dist.get_world_size()
    t = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=backend_device())
    best, ok = float("inf"), True
    for i in range(repeats + 1):
        t.fill_(dist.get_rank() + 1)
        if t.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if t.is_cuda:
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
        ok = ok and bool((t == world * (world + 1) / 2).all())
    return best, ok
