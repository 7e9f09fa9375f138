"""The trainer's side of a weight sync to `vllm serve` processes, on vLLM's own trainer-side API.

vLLM splits a sync into a control plane (a `VLLMWeightSyncClient`: /init_weight_transfer_engine,
/start_weight_update, /update_weights, /finish_weight_update) and a data plane (a `TrainerWeightTransferEngine` from
`WeightTransferTrainerFactory`, fed by a `WeightSource`, paired with a worker engine of the same name inside the
server). We use that API as it is:

- between GPUs, vLLM's `nccl` pair (packed broadcast, layerwise reload): the code vLLM tests on GPUs;
- on CPU, where every backend vLLM ships needs CUDA, our `grpo_broadcast` pair over gloo, registered in both
  factories under one name (grpo/rollout/transfer/broadcast.py: the trainer engine and the worker engine).

CI therefore runs the same client, source and factory calls as a GPU run; only the engine pair differs. Here:
`ModelSource` (ZeRO-3 gathered bucket by bucket, HF names, the checksum of what was sent) and `ServersClient` (one
control plane over several servers, each given its own ranks in the transfer group).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerWeightTransferEngine, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from grpo.rollout.http import parallel, request
from grpo.rollout.transfer import broadcast, nccl
from grpo.runtime.lora import compute_dtype, hf_name, logical_shape
from grpo.runtime.weights import checksum, weight_buckets

BROADCAST = broadcast.BACKEND

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


def trainer_engine(backend: str, *, rank: int, host: str, port: int, num_servers: int, bucket_bytes: int,
                   timeout: float, client: ServersClient, source: ModelSource) -> TrainerWeightTransferEngine:
    """Build and rendezvous the trainer engine through vLLM's factory (every trainer rank calls it; rank 0 sends)."""
    if backend == "nccl":
        info = nccl.trainer_init_info(host, port, num_servers + 1, rank, bucket_bytes)
    else:
        info = broadcast.BroadcastTrainerInitInfo(master_address=host, master_port=port, world_size=num_servers + 1,
                                                  rank=rank, bucket_bytes=bucket_bytes, timeout=timeout)
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
