#!/usr/bin/env bash
# Set-up if needed, lint, then the test suite. Extra arguments go to pytest (e.g. -m "not slow").
# A skipped test fails the run (a part set-up should provide is missing); GRPO_ALLOW_SKIPS=1 accepts skips.
#
# Without arguments (as CI runs it), the numerics tests (`-m numerics`: agreements whose rounding depends on the CPU's
# kernels) run a second time with torch's ATen, oneDNN and vLLM's CPU kernels held to AVX2, so that both kinds of CPU
# this project meets (AVX2-only, and AVX-512 with AMX or AVX512-BF16) are covered on whichever machine runs it.
# GRPO_ISA=avx2 holds a run given arguments to AVX2 too (e.g. GRPO_ISA=avx2 bash scripts/test.sh -m numerics).
# The pytest output logs the CPU model and flags, and the slowest 25 tests; the last line the time of each part.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/system-deps.sh
bash scripts/setup.sh
t_setup=$((SECONDS - t0))
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1 GRPO_FAIL_ON_SKIP=1
.venv/bin/ruff check grpo rewards tests benchmarks
avx2=(env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 GRPO_VLLM_CPU_ISA=avx2)
# Two workers (pytest-xdist) by default: most tests wait on processes they start (imports, DeepSpeed ranks, slurm,
# vLLM), so on 2 cores two at once take about half the time. GRPO_TEST_WORKERS=0 runs them in this process.
# Tests that share one thing (the one-node slurm, the session's `vllm serve`) run in one worker (xdist groups).
workers=${GRPO_TEST_WORKERS:-2}
pytest=(.venv/bin/python -m pytest -q -ra --durations=25)
[ "$workers" != 0 ] && pytest+=(-n "$workers" --dist loadgroup)
# Threads that wait sleep rather than spin: with two workers, and with vLLM servers beside trainers, there are more
# OpenMP threads than cores, and libgomp's default spinning let a waiting thread take the core from a working one.
# Measured here (2 cores): the canary test beside the update-reference test took 190 s and 187 s, and 40 s and 23 s
# with PASSIVE (19 s and 20 s each alone).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ "${GRPO_ISA:-}" = avx2 ] && pytest=("${avx2[@]}" "${pytest[@]}")
t1=$SECONDS
rc=0
"${pytest[@]}" "$@" || rc=$?
t_suite=$((SECONDS - t1))
t_avx2=0
# (not after an interruption or a usage error, exit codes 2 to 4: only after tests passed or failed)
if [ $# -eq 0 ] && [ "${GRPO_ISA:-}" != avx2 ] && [ "$rc" -le 1 ]; then
  echo "== the numerics tests again, held to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 GRPO_VLLM_CPU_ISA=avx2)"
  t2=$SECONDS
  "${avx2[@]}" "${pytest[@]}" -m numerics || { [ "$rc" -ne 0 ] || rc=1; }
  t_avx2=$((SECONDS - t2))
fi
echo "scripts/test.sh: set-up ${t_setup} s, suite ${t_suite} s, AVX2 numerics ${t_avx2} s, total $((SECONDS - t0)) s" \
     "($(( (SECONDS - t0) / 60 )) min); exit ${rc}"
exit "$rc"
