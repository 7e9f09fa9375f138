"""`grpo_broadcast`: our weight transfer between CPU processes, both halves. Every backend vLLM ships needs CUDA and CI
has none, so on CPU the trainer's sender broadcasts each bucket as one flat tensor per dtype over a gloo group that
every server worker joins; the worker loads it in place with the model's own `load_weights` (so fused vLLM
parameters are filled from HF names) and repacks the CPU kernels once the update is finished.

The trainer half is registered in vLLM's `WeightTransferTrainerFactory` when this module is imported; the worker half
in `WeightTransferEngineFactory` by `register_worker` (grpo/rollout/transfer/worker.py, inside `vllm serve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from grpo.rollout.http import ServerError, parallel
from grpo.runtime.model import DTYPES
from grpo.runtime.weights import buckets

BACKEND = "grpo_broadcast"


# ------------------------------------------------------------------------------------------------ trainer half

def weight_group(host: str, port: int, rank: int, world: int, timeout: float):
    """The gloo group of `grpo_broadcast`: the trainer's sender (rank 0, which hosts the store) and every server
    worker, outside any default group."""
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    store = dist.PrefixStore("grpo-weights", store)
    return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=timeout)), store


def dtype_groups(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """A bucket's tensors by dtype, one broadcast each: [(dtype, [(name, shape), ...]), ...]."""
    by: dict[str, list[tuple[str, list[int]]]] = {}
    for name, t in bucket:
        by.setdefault(str(t.dtype).removeprefix("torch."), []).append((name, list(t.shape)))
    return list(by.items())


@dataclass
class BroadcastTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int  # the sender plus every server worker
    bucket_bytes: int = 256 * 2**20
    timeout: float = 600.0


class BroadcastTrainerEngine(TrainerWeightTransferEngine[BroadcastTrainerInitInfo]):
    """`grpo_broadcast`, trainer side: per bucket, every server's /update_weights (which receives) runs while the
    sender broadcasts one flat CPU tensor per dtype, in the order the update info lists them. Other trainer ranks
    only iterate the source (their ZeRO-3 gathers)."""

    init_info_cls = BroadcastTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: BroadcastTrainerInitInfo, *, client, source: WeightSource | None = None
                     ) -> BroadcastTrainerEngine:
        if source is None:
            raise ValueError(f"{BACKEND} needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.bucket_bytes, engine.timeout = init_info.bucket_bytes, init_info.timeout
        engine.group = engine.store = None
        if engine.is_sender:
            worker = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                      "rank_offset": 1, "world_size": init_info.world_size, "timeout": init_info.timeout}
            _, (engine.group, engine.store) = parallel([
                lambda: client.init_weight_transfer_engine(worker),
                lambda: weight_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                     init_info.timeout)])
        return engine

    def send_weights(self) -> None:
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine as Nccl

        self.client.start_weight_update()
        # vLLM's own check that iteration agrees with metadata() (what its NCCL engine sizes buffers from), so the
        # CPU path holds our source to the contract the GPU path relies on
        pairs = Nccl._checked_iter(self.source, self.source.metadata())
        for bucket in buckets(pairs, self.bucket_bytes):
            self._send(bucket)
        self.client.finish_weight_update()

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        groups = dtype_groups(bucket)
        parallel([lambda: self.client.update_weights({"groups": groups}), lambda: self._broadcast(bucket, groups)])

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]], groups) -> None:
        tensors = dict(bucket)
        for _, entries in groups:
            flat = torch.cat([tensors[name].reshape(-1).cpu() for name, _ in entries])
            assert flat.numel() == sum(math.prod(shape) for _, shape in entries)
            if not self.group.broadcast(flat, 0).wait(timedelta(seconds=self.timeout)):
                raise ServerError(f"weight broadcast did not finish in {self.timeout:g} s")

    def shutdown(self) -> None:
        self.group = self.store = None


# ------------------------------------------------------------------------------------------------- worker half

@dataclass
class BroadcastInitInfo:
    # the same rendezvous fields as vLLM's NCCL init info, so one control plane
    # (grpo.rollout.transfer.base.ServersClient) serves both backends
    master_address: str  # the trainer's sender, which hosts the rendezvous store
    master_port: int
    rank_offset: int  # this server's first rank in the group (the sender is 0)
    world_size: int  # the sender plus every server worker
    timeout: float = 600.0


@dataclass
class BroadcastUpdateInfo:
    groups: list = field(default_factory=list)  # [(dtype, [(name, shape), ...]), ...]: one broadcast per dtype


class BroadcastWeightTransferEngine(WeightTransferEngine[BroadcastInitInfo, BroadcastUpdateInfo]):
    init_info_cls = BroadcastInitInfo
    update_info_cls = BroadcastUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: BroadcastInitInfo) -> None:
        pc = self.parallel_config  # vLLM's own rank rule for its NCCL engine: unique across data-parallel groups
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.group, self.store = weight_group(init_info.master_address, init_info.master_port, rank,
                                              init_info.world_size, init_info.timeout)

    def start_weight_update(self) -> None:
        """Nothing to prepare: weights are loaded in place, bucket by bucket."""

    def receive_weights(self, update_info: BroadcastUpdateInfo) -> None:
        tensors = []
        for dtype, entries in update_info.groups:
            flat = torch.empty(sum(math.prod(shape) for _, shape in entries), dtype=DTYPES[dtype])
            self.group.broadcast(flat, 0).wait()
            off = 0
            for name, shape in entries:
                n = math.prod(shape)
                tensors.append((name, flat[off : off + n].view(shape)))
                off += n
        self.model.load_weights(weights=iter(tensors))

    def finish_weight_update(self) -> None:
        from grpo.rollout.vllm_engine import repack_cpu_kernels

        repack_cpu_kernels(self.model)  # CPU: the packed kernels are rebuilt from the updated parameters

    def shutdown(self) -> None:
        self.group = None


def register_trainer() -> None:
    """Idempotent: our trainer engine in vLLM's trainer-side registry."""
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, BroadcastTrainerEngine)


def register_worker() -> None:
    """Idempotent: our worker engine in vLLM's worker-side registry (loaded lazily, by module path)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "BroadcastWeightTransferEngine")


register_trainer()
