"""The training runtime: DeepSpeed set-up, collectives, checkpoints, export, LoRA, model loading, weights and
tracking."""
