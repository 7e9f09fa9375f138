"""An R1-style GRPO trainer: vLLM/HF rollouts, rule-based rewards, DeepSpeed ZeRO updates."""

__version__ = "0.1.0"
