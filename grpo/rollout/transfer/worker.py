"""What `vllm serve` loads of ours, inside its worker process: a weight-transfer backend and two checks.

`grpo serve` starts a plain `vllm serve` with `--worker-extension-cls grpo.vllm_plugin.GrpoWorkerExtension`;
vLLM imports the extension's module in the worker before it loads the model, which registers our backend in vLLM's
own registry (`WeightTransferEngineFactory`) and, on CPU, keeps the linear weights as parameters (see
`grpo.rollout.vllm_engine.keep_plain_cpu_linears`). The trainer then drives vLLM's RL endpoints (`/pause`,
`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`, `/resume`).

Why a backend of ours: every backend vLLM ships (`nccl`, `ipc`, `sparse_nccl`, ...) needs CUDA, and CI has none.
Between GPUs the servers run vLLM's own `nccl` (transfer/nccl.py); on CPU, `grpo_broadcast` (transfer/broadcast.py,
both halves).
"""

from __future__ import annotations

from grpo.rollout.transfer import broadcast
from grpo.rollout.vllm_engine import keep_plain_cpu_linears
from grpo.runtime.weights import checksum


class GrpoWorkerExtension:
    """Methods the trainer calls through vLLM's `/collective_rpc` (one result per worker)."""

    def grpo_checksum(self) -> list[float]:
        """(sum, sum of squares) of every parameter the engine holds, for the post-sync check."""
        return list(checksum(self.model_runner.get_model().parameters()))


def register() -> None:
    """Idempotent: the backend in vLLM's registry; on CPU, linear weights kept as parameters (before model load)."""
    keep_plain_cpu_linears()
    broadcast.register_worker()


register()
