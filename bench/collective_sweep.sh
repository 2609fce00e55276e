#!/usr/bin/env bash
# Run bench/collective.py under horovodrun -np ${NP:-2} with several Horovod settings.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${DISTBN_VENV:-$here/.venv}
np=${NP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MXNET_CPU_WORKER_NTHREADS=${MXNET_CPU_WORKER_NTHREADS:-1}
for setting in "HOROVOD_CYCLE_TIME=5" "HOROVOD_CYCLE_TIME=1" "HOROVOD_CYCLE_TIME=0" \
               "HOROVOD_CYCLE_TIME=0 HOROVOD_CACHE_CAPACITY=0" \
               "HOROVOD_CYCLE_TIME=0 HOROVOD_FUSION_THRESHOLD=0"; do
  echo "== $setting"
  env $setting timeout 600 "$venv/bin/horovodrun" -np "$np" -H "localhost:$np" \
    "$venv/bin/python" -W ignore "$here/bench/collective.py" "$@" 2>&1 | sed -n 's/^\[0\]<stdout>://p'
done
