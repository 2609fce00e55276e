# Sourced by the launch scripts: thread and Horovod settings for distbn jobs. Any variable
# already set in the environment wins.

# Threads per worker: the cores of this machine shared among the local workers.
: "${DISTBN_LOCAL_WORKERS:=1}"
_cores=$(nproc 2>/dev/null || echo 1)
_threads=$(( _cores / DISTBN_LOCAL_WORKERS )); [ "$_threads" -ge 1 ] || _threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$_threads}
if [ "$OMP_NUM_THREADS" -gt 1 ] 2>/dev/null && [ $(( OMP_NUM_THREADS * DISTBN_LOCAL_WORKERS )) -gt "$_cores" ]; then
  # Measured here: OMP_NUM_THREADS=2 for each of 2 workers on 2 cores trained 3.7x (sync BN)
  # to 5.2x (Gluon BN) slower.
  echo "distbn: warning: OMP_NUM_THREADS=$OMP_NUM_THREADS for each of $DISTBN_LOCAL_WORKERS local" \
       "workers oversubscribes the $_cores cores (several times slower); unset it to get" \
       "cores / workers ($_threads)" >&2
fi
# MXNET_CPU_WORKER_NTHREADS stays at MXNet's default of 1 engine thread: with 2 engine threads
# and OMP_NUM_THREADS=2, two concurrent OpenBLAS calls from the bundled libopenblas spun
# forever here (distbn's channel sums are independent matrix-vector products).

# Horovod: no sync-BN path goes through Horovod (SyncBatchNorm's all-reduces run on distbn's own
# Gloo contexts, distbn/engine.py); Horovod carries one gradient all-reduce per step (and
# broadcasts, metrics). Its background thread wakes every cycle and, with Gloo, talks to the
# other workers each time even when idle: measured here, an idle worker used 1.46 s of CPU in
# 3 s at a 0.1 ms cycle, 0.31-0.36 s at 1 ms, 0.19-0.21 s at 5 ms -- CPU taken from compute on a
# machine with as many workers as cores. 5 ms was also the fastest for both Gluon's and
# distbn's LeNet step at 2 workers (bench/step_time.py, docs/results.md).
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-5}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
