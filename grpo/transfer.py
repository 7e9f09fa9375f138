"""The trainer's side of a weight sync to `vllm serve` processes, on vLLM's own trainer-side API.

vLLM splits a sync into a control plane (a `VLLMWeightSyncClient`: /init_weight_transfer_engine,
/start_weight_update, /update_weights, /finish_weight_update) and a data plane (a `TrainerWeightTransferEngine` from
`WeightTransferTrainerFactory`, fed by a `WeightSource`, paired with a worker engine of the same name inside the
server). We use that API as it is:

- between GPUs, vLLM's `nccl` pair (packed broadcast, layerwise reload): the code vLLM tests on GPUs;
- on CPU, where every backend vLLM ships needs CUDA, our `grpo_broadcast` pair over gloo, registered in both
  factories under one name: the trainer engine here, the worker engine in grpo/vllm_plugin.py.

CI therefore runs the same client, source and factory calls as a GPU run; only the engine pair differs. What is
ours: `ModelSource` (ZeRO-3 gathered bucket by bucket, HF names, the checksum of what was sent) and `ServersClient`
(one control plane over several servers, each given its own ranks in the transfer group).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from grpo.lora import compute_dtype, hf_name, logical_shape
from grpo.server_client import ServerError, parallel, request
from grpo.weights import _buckets, checksum, weight_buckets

BROADCAST = "grpo_broadcast"


def resolve_backend(choice: str, device: str) -> str:
    """`auto`: vLLM's `nccl` where this process has a GPU to send from, our gloo broadcast otherwise. The trainer
    and `grpo serve` resolve the same recipe each on its own machine; set it explicitly when they differ."""
    if choice != "auto":
        return choice
    return "nccl" if device != "cpu" and torch.cuda.is_available() else BROADCAST


class ModelSource(WeightSource):
    """The trainer's parameters under their HF names (vLLM's `WeightSource`). Under ZeRO-3 iterating gathers them
    bucket by bucket, a collective: every rank iterates, and after a failed send `finish_pass` walks the rest so
    the other ranks' gathers are not left waiting. The sender also sums what it yields (`sent`), for the check
    against what each server then holds."""

    def __init__(self, zero3: bool, bucket_bytes: int, sums: bool):
        self.model: torch.nn.Module | None = None  # set before each sync
        self.zero3, self.bucket_bytes, self.sums = zero3, bucket_bytes, sums
        self.sent: tuple[float, float] | None = None  # of the last complete pass
        self._pass: Iterator[tuple[str, torch.Tensor]] | None = None
        self._started = False

    def metadata(self) -> list[ParamMeta]:
        dtype = compute_dtype(self.model)
        return [ParamMeta(hf_name(n), *logical_shape(p, dtype))
                for n, p in self.model.named_parameters() if hf_name(n) is not None]  # LoRA: merged, HF names

    def begin(self, model: torch.nn.Module) -> None:
        """A new sync of `model`: no pass taken yet."""
        self.model, self._pass, self._started = model, None, False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._pass, self._started = self._walk(), True
        return self._pass

    def _walk(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.sent = None
        s = q = 0.0
        for bucket in weight_buckets(self.model, self.bucket_bytes, self.zero3):
            if self.sums:
                a, b = checksum(t for _, t in bucket)
                s, q = s + a, q + b
            yield from bucket
        self.sent = (s, q)

    def finish_pass(self) -> None:
        """Walk what this sync's pass left (after a failed send), or a whole pass when none was taken (a failure
        before the send): every rank must take part in every gather of the sync, whatever failed on rank 0."""
        rest = self._pass if self._started else self._walk()
        for _ in rest or ():
            pass
        self._pass, self._started = None, True


class ServersClient:
    """vLLM's `VLLMWeightSyncClient` protocol over several servers. Each call goes to every server at once (their
    workers meet the trainer inside the same collectives). At the handshake server i is given `rank_offset` + i:
    the engines place a server's workers at offset + worker index, and every server runs one worker (`grpo serve`
    sets no tensor parallelism). `version` is what `finish_weight_update` reports when the engine passes none."""

    def __init__(self, urls: list[str], timeout: float):
        self.urls, self.timeout = list(urls), timeout
        self.version: int = 0

    def _all(self, route: str, bodies: list[dict[str, Any]]) -> None:
        parallel([lambda u=u, b=b: request(u, route, b, self.timeout) for u, b in zip(self.urls, bodies, strict=True)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("/init_weight_transfer_engine",
                  [{"init_info": {**init_info, "rank_offset": init_info["rank_offset"] + i}}
                   for i in range(len(self.urls))])

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", [{}] * len(self.urls))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("/update_weights", [{"update_info": update_info}] * len(self.urls))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = str(self.version) if weight_version is None else weight_version
        self._all("/finish_weight_update", [{"weight_version": version}] * len(self.urls))


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
    backend: ClassVar[str] = BROADCAST

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
            raise ValueError(f"{BROADCAST} needs a WeightSource")
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
        for bucket in _buckets(pairs, self.bucket_bytes):
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


def register() -> None:
    """Idempotent: our trainer engine in vLLM's trainer-side registry."""
    if BROADCAST not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BROADCAST, BroadcastTrainerEngine)


register()


def trainer_engine(backend: str, *, rank: int, host: str, port: int, num_servers: int, bucket_bytes: int,
                   timeout: float, client: ServersClient, source: ModelSource) -> TrainerWeightTransferEngine:
    """Build and rendezvous the trainer engine through vLLM's factory (every trainer rank calls it; rank 0 sends)."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info: TrainerInitInfo = NCCLTrainerInitInfo(master_address=host, master_port=port,
                                                    world_size=num_servers + 1, rank=rank, packed=True,
                                                    packed_buffer_size_bytes=bucket_bytes)
    else:
        info = BroadcastTrainerInitInfo(master_address=host, master_port=port, world_size=num_servers + 1,
                                        rank=rank, bucket_bytes=bucket_bytes, timeout=timeout)
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
