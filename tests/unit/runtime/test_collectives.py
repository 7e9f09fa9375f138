"""Collectives go through grpo/runtime/collectives.py, which puts tensors where the backend takes them (NCCL: the rank's
GPU; gloo: the CPU). Before it, five modules all-reduced CPU tensors, which NCCL refuses at the first evaluation of
every GPU run ("No backend type associated with device type cpu")."""

from __future__ import annotations

import re
import zlib

import pytest
import torch
import torch.distributed as dist

from grpo.runtime import collectives as coll
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "gather", "gather_object", "scatter",
               "all_to_all", "send", "recv")
CALL = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")


def test_no_module_calls_a_collective_directly():
    offenders = []
    paths = sorted((ROOT / "grpo").rglob("*.py")) + sorted((ROOT / "rewards").rglob("*.py"))
    # every package's modules, not only the top level (grpo/loop/update.py is where a collective would creep in)
    assert ROOT / "grpo" / "loop" / "update.py" in paths and ROOT / "grpo" / "runtime" / "collectives.py" in paths
    for path in paths:
        if path == ROOT / "grpo" / "runtime" / "collectives.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if CALL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "use grpo.runtime.collectives instead:\n" + "\n".join(offenders)


def test_backend_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert coll.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert coll.backend_device() == torch.device("cpu")


@pytest.fixture
def gloo_group(tmp_path):
    """A one-rank default group. An in-process vLLM engine (tests/integration/test_vllm.py, earlier in the same
    xdist worker) leaves its own one-rank group as the default, never destroyed: the test then runs on that one."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo", (dist.get_world_size(), dist.get_backend())
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_over_a_real_group(gloo_group, monkeypatch):
    seen = []
    real = dist.all_reduce

    def strict(t, op=dist.ReduceOp.SUM, **kw):  # NCCL's rule, with the CPU standing in for the backend's device
        seen.append(t.device)
        assert t.device == coll.backend_device(), t.device
        return real(t, op=op, **kw)

    monkeypatch.setattr(dist, "all_reduce", strict)
    assert coll.all_sum([1.5, 2.0]) == [1.5, 2.0]
    assert coll.all_max([-1.0]) == [-1.0]
    assert coll.any_rank(True) and not coll.any_rank(False)
    assert coll.every_rank(True) and not coll.every_rank(False)
    assert coll.gather_objects({"a": 1}) == [{"a": 1}]
    assert coll.broadcast_object(("x", 2)) == ("x", 2)
    coll.barrier()
    assert len(seen) == 6


def test_sum_named_pairs_names_and_refuses_other_keys(gloo_group, monkeypatch):
    assert coll.sum_named({"b": 2.0, "a": 1.0}) == {"a": 1.0, "b": 2.0}
    # a second rank, faked: its vector (sorted values, then the CRC of its names) is added to ours
    real = coll.all_sum

    def two_ranks(other: dict[str, float]):
        def reduce(values):
            theirs = [other[k] for k in sorted(other)] + [float(zlib.crc32("\0".join(sorted(other)).encode()))]
            return [a + b for a, b in zip(real(values), theirs, strict=True)]
        return reduce

    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(coll, "all_sum", two_ranks({"a": 10.0, "b": 20.0}))
    assert coll.sum_named({"a": 1.0, "b": 2.0}) == {"a": 11.0, "b": 22.0}
    monkeypatch.setattr(coll, "all_sum", two_ranks({"a": 10.0, "c": 20.0}))  # same length, another name
    with pytest.raises(RuntimeError, match="different statistics"):
        coll.sum_named({"a": 1.0, "b": 2.0})
