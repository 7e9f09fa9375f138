"""Generation: the rollout engines behind one interface (hf, colocated vllm, vllm servers), the rollout source
the loop reads, scoring and advantages, the HTTP client, and weight transfer to the engines."""
