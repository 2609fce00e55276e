"""BN layer micro-benchmark on LeNet's four BN shapes: forward + backward time per call.

    python bench/layer.py [--batch 64 256] [--repeat 30] [--json out.json]
    horovodrun -np 2 python bench/layer.py --sync-only     # SyncBatchNorm across 2 workers

Variants, measured side by side in one process (interleaved rounds, medians reported):
  gluon   gluon.nn.BatchNorm (MXNet's fused operator) -- the speed to beat
  custom  distbn.BatchNorm: this worker's statistics, MXNet's operator (as gluon)
  sync    distbn.SyncBatchNorm: in one process MXNet's operator too (a group of one worker);
          under horovodrun the synced graph with the C++ operators of distbn/csrc
  ops     distbn.SyncBatchNorm built from MXNet's operators (GPUs, or no compiler): under
          horovodrun the synced graph without the C++ operators; in one process as sync
All but the book's block are hybridized (static_alloc, static_shape).
  book    distbn.batch_norm, the book's from-scratch NDArray formula, in the book's block
Ratios are to gluon at the same shape. Under horovodrun, "wait" is the time the forward and
backward collectives take when timed alone (blocking) at the same size.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

import distbn
from distbn import native
from distbn.comm import get_comm

SHAPES = {"conv1 (C=6, 24x24)": (6, 24, 24), "conv2 (C=16, 8x8)": (16, 8, 8),
          "dense1 (C=120)": (120,), "dense2 (C=84)": (84,)}


class BookBN(gluon.Block):
    """The book's block around distbn.batch_norm (moving stats as NDArrays, as in the book)."""

    def __init__(self, num_features, num_dims, **kw):
        super().__init__(**kw)
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = self.params.get("gamma", shape=shape, init=mx.init.One())
        self.beta = self.params.get("beta", shape=shape, init=mx.init.Zero())
        self.moving_mean, self.moving_var = nd.zeros(shape), nd.ones(shape)

    def forward(self, X):
        Y, self.moving_mean, self.moving_var = distbn.batch_norm(
            X, self.gamma.data(), self.beta.data(), self.moving_mean, self.moving_var,
            eps=1e-5, momentum=0.9)
        return Y


def make(kind, c, ndim):
    """The layer of ``kind``; all but the book's block hybridized (static_alloc), as they
    run in a compiled network."""
    if kind == "book":
        layer = BookBN(c, ndim)
    elif kind == "gluon":
        layer = gluon.nn.BatchNorm(in_channels=c)
    elif kind == "ops":  # the MXNet-operator graph: a layer takes its path when it is built
        saved = native._loaded["ok"]
        native._loaded["ok"] = False
        layer = distbn.SyncBatchNorm(c, ndim)
        native._loaded["ok"] = saved
    else:
        layer = (distbn.SyncBatchNorm if kind == "sync" else distbn.BatchNorm)(c, ndim)
    layer.initialize()
    if kind != "book":
        layer.hybridize(static_alloc=True, static_shape=True)
    return layer


def time_calls(layer, x, dy, n):
    """Median seconds of forward+backward, each call waited for (as a training step is)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with autograd.record():
            y = layer(x)
        y.backward(dy)
        x.grad.wait_to_read()
        nd.waitall()
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    native.available()  # build/load before timing
    kinds = ["sync"] if args.sync_only else ["gluon", "custom", "sync", "ops", "book"]
    if comm.size > 1 and not args.sync_only:
        kinds = ["gluon", "sync"]
    rows = []
    for batch in args.batch:
        for label, tail in SHAPES.items():
            shape = (batch,) + tail
            ndim = len(shape)
            rs = np.random.RandomState(0)
            x = nd.array(rs.rand(*shape))
            x.attach_grad()
            dy = nd.array(rs.randn(*shape))
            layers = {k: make(k, shape[1], ndim) for k in kinds}
            for k in kinds:  # warm-up
                time_calls(layers[k], x, dy, 3)
            samples = {k: [] for k in kinds}
            for _ in range(args.rounds):  # interleaved: drifting machine load hits all alike
                for k in kinds:
                    samples[k] += time_calls(layers[k], x, dy, args.repeat // args.rounds or 1)
            med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            row = {"batch": batch, "layer": label, "workers": comm.size,
                   **{f"{k}_ms": round(med[k], 4) for k in kinds}}
            if "gluon" in med:
                row.update({f"{k}_vs_gluon": round(med[k] / med["gluon"], 3) for k in kinds if k != "gluon"})
            rows.append(row)
    if comm.rank == 0:
        keys = list(rows[0].keys())
        print(" | ".join(keys))
        for r in rows:
            print(" | ".join(str(r[k]) for k in keys))
        total = {k: sum(r[f"{k}_ms"] for r in rows) for k in kinds}
        print("sum over shapes (ms):", {k: round(v, 3) for k, v in total.items()})
        if "gluon" in total:
            print("ratio of sums to gluon:", {k: round(v / total["gluon"], 3) for k, v in total.items()})
        print("threads: OMP_NUM_THREADS=%s MXNET_CPU_WORKER_NTHREADS=%s" % (
            os.environ.get("OMP_NUM_THREADS"), os.environ.get("MXNET_CPU_WORKER_NTHREADS")))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "sum_ms": total}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
