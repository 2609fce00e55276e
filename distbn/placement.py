"""Thread placement: each local worker on cores of its own.

Why: a sync layer makes the workers meet twice per layer and step, so a worker that is held up
(one of its threads preempted by another worker's thread, say) holds all of them up. Measured
here (bench/step_time.py, LeNet, 2 workers on 2 cores, docs/results.md): unpinned, the sync
step took 1.2-1.4x Gluon's; with each worker's threads on a core of its own, 1.02-1.09x, and
Gluon's own step got faster too.

The cores this process may use are split into ``local_size`` contiguous slices and every
thread of the process (MXNet's engine, OpenMP, Horovod's background thread; threads started
later inherit it) is moved to the slice of ``local_rank``; with more workers than cores,
workers share cores round-robin. Left alone: a process that someone has already placed (its
allowed cores are fewer than the machine's: ``taskset``, SLURM's ``--cpu-bind``, a cgroup
cpuset), and any process when ``DISTBN_PIN=0`` (two jobs on one machine, say).
"""
from __future__ import annotations

import os


def slice_for(cpus: list, local_rank: int, local_size: int) -> list:
    """The cores of local worker ``local_rank`` of ``local_size``, from ``cpus`` (sorted)."""
    if local_size > len(cpus):
        return [cpus[local_rank % len(cpus)]]
    per = len(cpus) // local_size
    return cpus[local_rank * per:(local_rank + 1) * per]


def pin_local_worker(local_rank: int, local_size: int) -> list:
    """Moves this process's threads to its slice of cores; returns the slice, or [] when it
    leaves the process where it is (see the module docstring)."""
    if local_size < 2 or os.environ.get("DISTBN_PIN", "1") == "0":
        return []
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < (os.cpu_count() or 0):
        return []  # placed by someone else already
    mine = slice_for(cpus, local_rank, local_size)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except (ProcessLookupError, PermissionError):  # a thread that has just ended
            pass
    return mine
