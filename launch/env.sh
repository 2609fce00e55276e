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

# Horovod: SyncBatchNorm issues two small all-reduces per layer and step, each on the critical
# path, and each waits for the background thread's next cycle (default 1 ms). 0 makes that
# thread spin, which on a machine with as many workers as cores takes a core from compute.
# Measured here (bench/throughput.py, 2 workers on 2 cores, LeNet sync BN, examples/s):
# cycle 1 ms 3538, 0.3 ms 3951, 0.1 ms 4324, 0 ms 3325. Tensor names repeat every step, so
# Horovod's response cache (on by default) skips most of the negotiation.
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-0.1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
