#!/usr/bin/env bash
# One node, N local workers:  launch/local.sh CONFIG [train args...]
#   NP=4 launch/local.sh configs/lenet_syncbn.yaml --set train.epochs=2
# NP defaults to the number of GPUs, or on a CPU machine to min(cores, 4). NP=1 runs plain
# python (the single-GPU / single-CPU fallback); NP>1 runs horovodrun -np NP -H localhost:NP.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${1:?usage: launch/local.sh CONFIG [train args...]}; shift
venv=${DISTBN_VENV:-$here/.venv}
if [ -z "${NP:-}" ]; then
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  if [ "$gpus" -gt 0 ]; then NP=$gpus; else NP=$(nproc); [ "$NP" -le 4 ] || NP=4; fi
fi
export DISTBN_LOCAL_WORKERS=$NP
. "$here/launch/env.sh"
. "$here/launch/job.sh"
if [ "$NP" -eq 1 ]; then
  exec "$venv/bin/python" -m distbn.train --config "$config" "$@"
fi
# Config and run directory checked in one process first: a bad one prints its one line
# without horovodrun's own traceback after it.
"$venv/bin/python" -m distbn.train --config "$config" "$@" --check
run_job "$venv/bin/horovodrun" -np "$NP" -H "localhost:$NP" \
  "$venv/bin/python" -m distbn.train --config "$config" "$@"
