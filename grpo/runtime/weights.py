"""The trainer's weights as the rollout engines and checks see them: HF-named buckets and a float64 checksum.

One checksum, one tolerance, for every comparison of weights: trainer against a vLLM engine after a sync, the
ranks' replicas before the final export, a checkpoint against what was saved (`grpo doctor`). Copies of the same
tensors sum in the same order to the same float64, so the tolerance only has to absorb a different slicing of
the sums (a fused vLLM parameter holds two HF tensors): 1e-9 relative, far below one changed value (about 1e-7 of
a 135M model's sum of squares for a change of 1e-3).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

REL_TOLERANCE = 1e-9


def weight_buckets(model: torch.nn.Module, bucket_bytes: int, zero3: bool
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The trainer's parameters under their HF names, in buckets of about `bucket_bytes`. Under ZeRO-3 each bucket
    is gathered on entry and released after the consumer is done with it (every rank must iterate: gathering is
    collective)."""
    from grpo.runtime import lora
    if lora.active(model):  # merged adapters (LoRA runs below ZeRO-3: nothing to gather)
        yield from buckets(lora.merged_parameters(model), bucket_bytes)
        return
    params = [(n, p) for n, p in model.named_parameters()]
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def emit(b):
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in b]):
                yield [(n, p.detach()) for n, p in b]
        else:
            yield [(n, p.detach()) for n, p in b]

    for name, p in params:
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        bucket.append((name, p))
        size += numel * p.element_size()
        if size >= bucket_bytes:
            yield from emit(bucket)
            bucket, size = [], 0
    if bucket:
        yield from emit(bucket)


def buckets(pairs, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in pairs:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def checksum(tensors, slice_numel: int = 1 << 24) -> tuple[float, float]:
    """(sum, sum of squares) in float64, over slices of at most `slice_numel` values: a float64 copy of a whole
    7B embedding would be 4 GiB of temporaries on a server GPU that is already full."""
    s = q = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), slice_numel):
            x = flat[i : i + slice_numel].double()
            s += float(x.sum())
            q += float((x * x).sum())
    return s, q


def checksums_match(a: tuple[float, float], b: tuple[float, float], rel: float = REL_TOLERANCE) -> bool:
    return all(abs(x - y) <= rel * (1.0 + abs(x)) for x, y in zip(a, b, strict=True))


def model_checksum(model: torch.nn.Module, zero3: bool, bucket_bytes: int = 256 * 2**20) -> tuple[float, float]:
    """The checksum of a model's full weights (gathered bucket by bucket under ZeRO-3: every rank must call it)."""
    s = q = 0.0
    for bucket in weight_buckets(model, bucket_bytes, zero3):
        a, b = checksum(t for _, t in bucket)
        s, q = s + a, q + b
    return s, q
