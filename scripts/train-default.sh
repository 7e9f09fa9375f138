#!/usr/bin/env bash
# The main job on the embedded default: set-up if needed, then a short real GRPO run on CPU that shows the
# held-out accuracy and the reward rising. Extra arguments are dotted overrides: scripts/train-default.sh steps=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
exec .venv/bin/grpo train recipes/smollm2-135m-arith.yaml "$@"
