#!/bin/bash
# One training node's share of slurm/multinode.slurm: torchrun with the given arguments, and the preemption
# warning passed on to its workers (torchrun itself does not forward SIGUSR1, and dies of it).
#   node-train.sh PYTHON [torchrun arguments ...] -m grpo train RECIPE [overrides ...]
PY=$1; shift
"$PY" -m torch.distributed.run "$@" &
child=$!
trap 'pkill -USR1 -P "$child"' USR1 TERM
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
exit "$rc"
