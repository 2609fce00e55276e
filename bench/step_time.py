"""Training-step time of whole hybridized networks, SyncBatchNorm against Gluon's BatchNorm.

    python bench/step_time.py                                  # one process
    horovodrun -np 2 -H localhost:2 python bench/step_time.py  # 2 workers (Gloo)
    python bench/step_time.py --arch resnet18_v1 --global-batch 64 --rounds 9 --json out.json
    MXNET_CPU_TEMP_COPY=1024 python bench/step_time.py --devices 2      # 1 process x 2 devices

For each architecture, one network per BN kind is built (same initial values), hybridized
with static_alloc and static_shape as users would, and trained on random 1x28x28 inputs
(timing only). The kinds take turns: each round runs --steps steps of every kind, waited for
step by step (forward, backward, trainer step), so a drifting machine load hits all alike.
Reported: median step time over all rounds per kind, the ratio of medians to Gluon's, and the
median of the per-round ratios, rank 0's clock; with several workers, the mean time per step
rank 0 spent inside the sync layers' collectives (engine_ms: Gloo all-reduces, waiting for the
other workers included). A step ends when every worker's gradients are
all-reduced, so rank 0's time is the job's. ``--devices D``: every worker's network lives on D
CPU devices and each step is the book's multi-device loop (a forward per device, then a
backward per device's loss); Gluon's BN then normalizes each device with its own statistics,
SyncBatchNorm with those of every device of every worker.
"""
import argparse
import statistics
import time

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

from distbn import engine
from distbn.comm import get_comm
from distbn.models import build, finish_shapes
from report import emit

DEFAULT_BATCH = {"lenet": 256, "resnet18_v1": 64}


def make(arch, bn, comm, batch, ctx=None):
    ctx = ctx or [mx.current_context()]
    mx.random.seed(0)
    net = build(arch, bn)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    # static_shape with several CPU devices hung here (LeNet, even at MXNET_CPU_TEMP_COPY=1024;
    # not understood: docs/layer.md): static_alloc alone there.
    net.hybridize(static_alloc=True, static_shape=len(ctx) == 1)
    finish_shapes(net, nd.zeros((batch, 1, 28, 28), ctx=ctx[0]))  # model-zoo shapes: deferred
    comm.broadcast_parameters(net.collect_params(), prefix=f"bench.{arch}.{bn}")
    opt = {"learning_rate": 0.01, "momentum": 0.9}
    return net, comm.trainer(net.collect_params(), "sgd", opt)


def engine_seconds(comm):
    """Seconds inside the sync layers' collectives so far; zero without the engine."""
    return engine.seconds() if comm.engine else 0.0


def run_steps(net, trainer, xs, ys, n):
    """``n`` steps on the batch ``xs``/``ys`` (or lists of them, one per device), each waited
    for."""
    if not isinstance(xs, (list, tuple)):
        xs, ys = [xs], [ys]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with autograd.record():
            losses = [loss_fn(net(x), y) for x, y in zip(xs, ys)]
        for loss in losses:
            loss.backward()
        trainer.step(sum(x.shape[0] for x in xs))
        nd.waitall()
        times.append(time.perf_counter() - t)
    return times


def bench(arch, kinds, comm, global_batch, rounds, steps, warmup, devices=1):
    batch = global_batch // comm.size
    ctx = [mx.cpu(i) for i in range(devices)]
    rs = np.random.RandomState(comm.rank)
    x, y = nd.array(rs.rand(batch, 1, 28, 28)), nd.array(rs.randint(0, 10, batch))
    x, y = gluon.utils.split_and_load(x, ctx), gluon.utils.split_and_load(y, ctx)
    nets = {k: make(arch, k, comm, batch // devices, ctx) for k in kinds}
    for k in kinds:
        run_steps(*nets[k], x, y, warmup)
    samples = {k: [] for k in kinds}
    per_round = {k: [] for k in kinds}
    in_engine = {k: 0.0 for k in kinds}  # seconds inside the sync layers' collectives
    for _ in range(rounds):
        med = {}
        for k in kinds:
            before = engine_seconds(comm)
            t = run_steps(*nets[k], x, y, steps)
            in_engine[k] += engine_seconds(comm) - before
            samples[k] += t
            med[k] = statistics.median(t)
        for k in kinds:
            per_round[k].append(med[k] / med[kinds[0]])
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"arch": arch, "workers": comm.size, "devices_per_worker": devices,
            "batch_per_worker": batch,
            "rounds": rounds, "steps_per_round": steps,
            **{f"{k}_ms": round(ms[k], 2) for k in kinds},
            **{f"{k}_vs_{kinds[0]}": round(ms[k] / ms[kinds[0]], 3) for k in kinds[1:]},
            **{f"{k}_vs_{kinds[0]}_round_median": round(statistics.median(per_round[k]), 3)
               for k in kinds[1:]},
            **{f"{k}_engine_ms": round(in_engine[k] * 1e3 / (rounds * steps), 2)
               for k in kinds if comm.engine}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["lenet", "resnet18_v1"])
    ap.add_argument("--bn", nargs="+", default=["gluon", "sync"], help="first: the baseline")
    ap.add_argument("--global-batch", type=int, help="default: 256 for lenet, 64 otherwise")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per kind and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--devices", type=int, default=1, help="CPU devices per worker")
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    rows = [bench(a, args.bn, comm, args.global_batch or DEFAULT_BATCH.get(a, 64), args.rounds,
                  args.steps, args.warmup, args.devices) for a in args.arch]
    if comm.rank == 0:
        emit(rows, args.json)


if __name__ == "__main__":
    main()
