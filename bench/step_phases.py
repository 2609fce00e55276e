"""Where a LeNet training step's time goes: forward, backward, optimizer step, per BN kind.

    horovodrun -np 2 -H localhost:2 python bench/step_phases.py [--steps 50] [--json out.json]
    python bench/step_phases.py                       # one process

Global batch 256 split over the workers (the book's setting), random inputs (timing only).
Each phase is waited for before the next starts, so the phases add up to a step with no
overlap between them; medians over --steps steps after 10 warm-up steps, rank 0's clock.
Also counts distbn's own collectives per step (the sync BN layers'; the trainer's gradient
all-reduce comes on top in every mode).
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

from distbn.comm import get_comm
from distbn.models import lenet

PHASES = ("forward", "backward", "update", "step")


def time_steps(bn, comm, steps, batch):
    mx.random.seed(0)
    net = lenet(bn)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    comm.broadcast_parameters(net.collect_params(), prefix=f"bench.{bn}")
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rs = np.random.RandomState(comm.rank)
    x, y = nd.array(rs.rand(batch, 1, 28, 28)), nd.array(rs.randint(0, 10, batch))
    samples = {p: [] for p in PHASES}
    issued = 0
    for i in range(steps + 10):
        before = comm.collectives
        t0 = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(x), y)
        nd.waitall()
        t1 = time.perf_counter()
        loss.backward()
        nd.waitall()
        t2 = time.perf_counter()
        trainer.step(batch)
        nd.waitall()
        t3 = time.perf_counter()
        if i >= 10:
            for p, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                samples[p].append(v)
            issued += comm.collectives - before
    # distbn's own collectives (the BN layers'); the trainer's gradient all-reduce is extra
    return {**{p: round(statistics.median(v) * 1e3, 2) for p, v in samples.items()},
            "distbn_collectives_per_step": issued / steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--bn", nargs="+", default=["gluon", "custom", "sync"])
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    batch = args.global_batch // comm.size
    rows = [{"bn": bn, "workers": comm.size, **time_steps(bn, comm, args.steps, batch)}
            for bn in args.bn]
    if comm.rank == 0:
        print(f"{comm.size} worker(s) x batch {batch}; median ms per phase over {args.steps} steps")
        print("bn | " + " | ".join(PHASES) + " | distbn collectives per step")
        for r in rows:
            print(f"{r['bn']} | " + " | ".join(str(r[p]) for p in PHASES) +
                  f" | {r['distbn_collectives_per_step']:g}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "per_worker_batch": batch}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
