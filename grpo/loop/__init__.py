"""The loops: `grpo train` (train.py), `grpo sft` (sft.py) and `grpo distill` (distill.py) on one run scaffold (run.py),
with the set-up (state.py), the policy update (update.py) and evaluation."""
