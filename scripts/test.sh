#!/usr/bin/env bash
# Set-up if needed, lint, then the test suite. Extra arguments go to pytest (e.g. -m "not slow").
# A skipped test fails the run (a part set-up should provide is missing); GRPO_ALLOW_SKIPS=1 accepts skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1 GRPO_FAIL_ON_SKIP=1
.venv/bin/ruff check grpo rewards tests benchmarks
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
