"""The path `vllm serve` is given (`--worker-extension-cls grpo.vllm_plugin.GrpoWorkerExtension`), kept stable for
users' own launch scripts; the code lives in grpo/rollout/transfer/worker.py."""

from grpo.rollout.transfer.worker import GrpoWorkerExtension

__all__ = ["GrpoWorkerExtension"]
