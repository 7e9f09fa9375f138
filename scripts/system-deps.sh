#!/usr/bin/env bash
# System packages the tests need beyond Python: bubblewrap (the code-reward sandbox), Debian's python3 under /usr
# (the interpreter the sandbox runs), and slurm-wlm + munge (a real one-node slurm for the slurm/ tests, started by
# scripts/slurm-local.sh). Installs them with apt when run as root; otherwise says what is missing.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ -x /usr/bin/python3 ] || need+=(python3-minimal)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
else
  echo "system-deps: missing ${need[*]}: install them (e.g. sudo apt-get install ${need[*]}); the sandbox tests" \
       "and slurm tests are skipped, and code rewards refuse to run without bubblewrap" >&2
fi
