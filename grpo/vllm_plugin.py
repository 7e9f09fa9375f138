"""What `vllm serve` loads of ours, inside its worker process: a weight-transfer backend and two checks.

`grpo serve` starts a plain `vllm serve` with `--worker-extension-cls grpo.vllm_plugin.GrpoWorkerExtension`;
vLLM imports this module in the worker before it loads the model, which registers the backend below in vLLM's own
registry (`WeightTransferEngineFactory`) and, on CPU, keeps the linear weights as parameters (see
`grpo.vllm_engine._keep_plain_cpu_linears`). The trainer then drives vLLM's RL endpoints (`/pause`,
`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`, `/resume`).

Why a backend of ours: every backend vLLM ships (`nccl`, `ipc`, `sparse_nccl`, ...) needs CUDA, and CI has none.
Between GPUs the servers run vLLM's own `nccl` (grpo.transfer.resolve_backend); on CPU `grpo_broadcast` receives
each bucket as one flat tensor per dtype over a gloo group it joins with the trainer (its trainer half is
grpo.transfer.BroadcastTrainerEngine), loads it in place with the model's own `load_weights` (so fused vLLM
parameters are filled from HF names), and repacks the CPU kernels once the update is finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from grpo.model import DTYPES
from grpo.vllm_engine import _keep_plain_cpu_linears, repack_cpu_kernels
from grpo.weights import checksum

BACKEND = "grpo_broadcast"


@dataclass
class BroadcastInitInfo:
    # the same rendezvous fields as vLLM's NCCL init info, so one control plane (grpo.transfer.ServersClient)
    # serves both backends
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
        from grpo.transfer import weight_group

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
        repack_cpu_kernels(self.model)  # CPU: the packed kernels are rebuilt from the updated parameters

    def shutdown(self) -> None:
        self.group = None


class GrpoWorkerExtension:
    """Methods the trainer calls through vLLM's `/collective_rpc` (one result per worker)."""

    def grpo_checksum(self) -> list[float]:
        """(sum, sum of squares) of every parameter the engine holds, for the post-sync check."""
        return list(checksum(self.model_runner.get_model().parameters()))


def register() -> None:
    """Idempotent: the backend in vLLM's registry; on CPU, linear weights kept as parameters (before model load)."""
    _keep_plain_cpu_linears()
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "BroadcastWeightTransferEngine")


register()
