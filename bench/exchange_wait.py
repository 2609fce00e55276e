"""Where a synced training step's extra time goes: per layer exchange, the wait for the other
workers against the exchange itself, forward and backward.

    horovodrun -np 2 -H localhost:2 python bench/exchange_wait.py [--arch lenet resnet18_v1]
    MXNET_CPU_WORKER_NTHREADS=2 horovodrun -np 2 -H localhost:2 python bench/exchange_wait.py
    python bench/exchange_wait.py --runs 7 [--vary MXNET_CPU_WORKER_NTHREADS=1,2] [--np 2]

Workers on one host only (their steady clocks are one clock). Each round runs --steps steps
of Gluon's BN and then of SyncBatchNorm (bench/step_time.py's networks and steps, random
inputs), the synced ones with the engine's exchange trace on (distbn.engine.trace): for each
all-reduce, when the operator asked for it and when it returned, on every worker. For one
exchange, the last worker to ask starts it: a worker's *wait* is the time from its own ask to
that last ask (the other workers were slower to get there), the *exchange* the time from the
last ask to its return (Gloo's messages, the sleeping reads' wake-ups). Reported per network:
the step times (medians), their difference, and per step the sums of wait and exchange over
the layers (mean over workers and steps); with --layers, the same per layer.

The sums bound what overlapping the exchange with other work could win: the engine thread
of a worker is blocked for wait + exchange in each call, and with one engine thread nothing
else of that worker runs meanwhile.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from mxnet import nd

from distbn import engine
from distbn.comm import get_comm
from report import emit
from step_time import DEFAULT_BATCH, make, run_steps


def split(records_by_worker):
    """Per exchange (in order), each worker's (wait, exchange) in ns, and the exchange's name.
    Every worker runs the same exchanges in the same order (their tags say so: checked)."""
    names = [r[0] for r in records_by_worker[0]]
    for records in records_by_worker[1:]:
        if [r[0] for r in records] != names:
            raise SystemExit("exchange_wait: the workers' traces differ (not one host's "
                             "lock-step exchanges?)")
    asked = np.array([[r[1] for r in records] for records in records_by_worker])  # (W, calls)
    returned = np.array([[r[2] for r in records] for records in records_by_worker])
    last_ask = asked.max(axis=0)
    return names, last_ask - asked, returned - last_ask


def bench(arch, comm, rounds, steps, warmup):
    batch = (DEFAULT_BATCH.get(arch, 64)) // comm.size
    rs = np.random.RandomState(comm.rank)
    x, y = nd.array(rs.rand(batch, 1, 28, 28)), nd.array(rs.randint(0, 10, batch))
    nets = {k: make(arch, k, comm, batch) for k in ("gluon", "sync")}
    for k in nets:
        run_steps(*nets[k], x, y, warmup)
    times = {k: [] for k in nets}
    waits, exchanges, per_layer = [], [], defaultdict(lambda: ([], []))
    for _ in range(rounds):
        times["gluon"] += run_steps(*nets["gluon"], x, y, steps)
        engine.trace(100000)
        times["sync"] += run_steps(*nets["sync"], x, y, steps)
        records = comm.allgather_object(engine.traced())
        engine.trace(0)
        names, wait, exchange = split(records)
        waits.append(wait.sum(axis=1).mean() / steps)  # per step, mean over workers
        exchanges.append(exchange.sum(axis=1).mean() / steps)
        for i, name in enumerate(names):
            per_layer[name][0].append(wait[:, i].mean())
            per_layer[name][1].append(exchange[:, i].mean())
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    row = {"arch": arch, "workers": comm.size, "batch_per_worker": batch, "rounds": rounds,
           "steps_per_round": steps, "exchanges_per_step": len(names) // steps,
           "gluon_ms": round(ms["gluon"], 2), "sync_ms": round(ms["sync"], 2),
           "sync_vs_gluon": round(ms["sync"] / ms["gluon"], 3),
           "extra_ms": round(ms["sync"] - ms["gluon"], 2),
           "wait_ms_per_step": round(statistics.median(waits) * 1e-6, 2),
           "exchange_ms_per_step": round(statistics.median(exchanges) * 1e-6, 2)}
    layers = [{"arch": arch, "exchange": name,
               "wait_us": round(statistics.median(w) * 1e-3, 1),
               "exchange_us": round(statistics.median(e) * 1e-3, 1)}
              for name, (w, e) in per_layer.items()]
    return row, layers


def drive(args):
    """--runs: launches the measurement ``runs`` times per value of the --vary variable, the
    values taking turns run by run (a drifting machine load hits all alike), and prints the
    medians of each figure over the runs."""
    here = Path(__file__).resolve().parent
    var, values = args.vary.split("=", 1)
    runs = defaultdict(list)  # (value, arch) -> rows
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for value in values.split(","):
                out = Path(tmp) / f"{value}-{i}.json"
                cmd = ["horovodrun", "-np", str(args.np), "-H", f"localhost:{args.np}",
                       sys.executable, str(here / "exchange_wait.py"), "--arch", *args.arch,
                       "--rounds", str(args.rounds), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--json", str(out)]
                env = {"OMP_NUM_THREADS": "1", "HOROVOD_CYCLE_TIME": "5",  # launch/env.sh's
                       **os.environ, var: value}
                subprocess.run(cmd, env=env, check=True, timeout=1800, capture_output=True)
                for row in json.loads(out.read_text())["rows"]:
                    runs[value, row["arch"]].append(row)
                    print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    figures = ("gluon_ms", "sync_ms", "sync_vs_gluon", "extra_ms", "wait_ms_per_step",
               "exchange_ms_per_step")
    rows = [{"arch": arch, var: value, "workers": args.np, "runs": len(got),
             **{f"median_{k}": round(statistics.median(r[k] for r in got), 3) for k in figures},
             "sync_vs_gluon_each": [r["sync_vs_gluon"] for r in got]}
            for (value, arch), got in runs.items()]
    emit(rows, args.json)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, help="launch this many runs per --vary value")
    ap.add_argument("--vary", default="MXNET_CPU_WORKER_NTHREADS=1,2",
                    help="with --runs: VAR=V1,V2,...: the values take turns, run by run")
    ap.add_argument("--np", type=int, default=2, help="with --runs: local workers")
    ap.add_argument("--arch", nargs="+", default=["lenet", "resnet18_v1"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="also a row per layer exchange")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.runs:
        return drive(args)
    comm = get_comm()
    if comm.size < 2 or comm.local_size != comm.size:
        raise SystemExit("exchange_wait: run it with 2 or more workers on one host")
    rows, layers = [], []
    for arch in args.arch:
        row, per_layer = bench(arch, comm, args.rounds, args.steps, args.warmup)
        rows.append(row)
        layers += per_layer
    if comm.rank == 0:
        for r in rows:
            r["engine_threads"] = os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1")
            r["horovod_cycle_ms"] = os.environ.get("HOROVOD_CYCLE_TIME", "")
        emit(rows + (layers if args.layers else []), args.json, layers=layers)


if __name__ == "__main__":
    main()
