"""The algorithm: group-relative advantages, the policy loss, logprobs of packed sequences, prefix attention.

Plain functions on tensors; nothing here knows about DeepSpeed, vLLM or the run."""
