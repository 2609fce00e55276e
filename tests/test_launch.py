"""launch/env.sh: threads per worker from the core count, and a warning when an inherited
OMP_NUM_THREADS oversubscribes the cores."""
import os
import subprocess

from conftest import ROOT


def source_env(workers, omp=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HOROVOD_CYCLE_TIME")}
    env["DISTBN_LOCAL_WORKERS"] = str(workers)
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    proc = subprocess.run(["bash", "-c", '. launch/env.sh; echo "$OMP_NUM_THREADS $HOROVOD_CYCLE_TIME"'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=True)
    threads, cycle = proc.stdout.split()
    return int(threads), cycle, proc.stderr


def test_threads_are_cores_over_workers():
    cores = os.cpu_count()
    for workers in (1, 2, 4):
        threads, cycle, err = source_env(workers)
        assert threads == max(1, cores // workers) and cycle == "5"
        assert "warning" not in err


def test_inherited_threads_win_but_oversubscription_is_named():
    omp = max(2, os.cpu_count())
    threads, _, err = source_env(2, omp)
    assert threads == omp
    assert f"OMP_NUM_THREADS={omp} for each of 2 local workers oversubscribes" in err
    _, _, err = source_env(1, 1)
    assert err == ""
