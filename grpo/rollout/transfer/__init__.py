"""Weight transfer to `vllm serve` processes, on vLLM's weight-transfer API: the shared control plane and
source (base.py), one module per mechanism (broadcast.py: our gloo pair for CPU; nccl.py: vLLM's own between GPUs),
and what the server's worker loads of ours (worker.py)."""
