"""What a SyncBatchNorm layer step costs across workers, and how much of it is the collective.

    horovodrun -np 2 -H localhost:2 python bench/collective.py [--batch 128] [--json out.json]

For each of LeNet's four BN shapes (per-worker batch --batch): the median forward+backward
time of gluon.nn.BatchNorm (local statistics, no collective) and of distbn.SyncBatchNorm, and
the median latency of a layer's two collectives done alone: through the sync layers' engine
(Gloo's all-reduce, 1 + 2C float64 both ways: what the layer uses) and, for comparison,
through Horovod (forward: 1 + 2C float64, backward: 2C float32).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from mxnet import autograd, gluon, nd

import distbn
from distbn import engine
from distbn.comm import get_comm

SHAPES = {"conv1": (6, 24, 24), "conv2": (16, 8, 8), "dense1": (120,), "dense2": (84,)}


def median_ms(fn, n):
    fn()
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    rows = []
    for name, tail in SHAPES.items():
        shape = (args.batch,) + tail
        c = shape[1]
        x = nd.array(np.random.RandomState(comm.rank).rand(*shape))
        x.attach_grad()
        dy = nd.ones(shape)
        layers = {"gluon": gluon.nn.BatchNorm(in_channels=c), "sync": distbn.SyncBatchNorm(c, len(shape))}
        for layer in layers.values():
            layer.initialize()

        def step(layer):
            def run():
                with autograd.record():
                    y = layer(x)
                y.backward(dy)
                nd.waitall()
            return run
        fwd_t = nd.zeros(1 + 2 * c, dtype="float64")
        bwd_t = nd.zeros(2 * c)
        def collectives():  # the same names every call, as a layer's steps (response cache hits)
            comm.allreduce_sum(fwd_t, name=f"bench.{name}.f").wait_to_read()
            comm.allreduce_sum(bwd_t, name=f"bench.{name}.b").wait_to_read()
        packed = np.zeros(1 + 2 * c)  # the engine sums float64 (1 + 2C) both ways
        def exchanges():
            engine.allreduce(packed, f"bench.{name}.f")
            engine.allreduce(packed, f"bench.{name}.b")
        kinds = ("gluon", "sync", "coll") + (("engine",) if comm.engine else ())
        t = {kind: [] for kind in kinds}
        for _ in range(4):  # interleave the measurements
            t["gluon"].append(median_ms(step(layers["gluon"]), args.repeat // 4))
            t["sync"].append(median_ms(step(layers["sync"]), args.repeat // 4))
            t["coll"].append(median_ms(collectives, args.repeat // 4))
            if comm.engine:
                t["engine"].append(median_ms(exchanges, args.repeat // 4))
        med = {kind: statistics.median(v) for kind, v in t.items()}
        med.setdefault("engine", float("nan"))
        rows.append({"layer": name, "shape": list(shape), "workers": comm.size,
                     "gluon_ms": round(med["gluon"], 3), "sync_ms": round(med["sync"], 3),
                     "collectives_ms": round(med["coll"], 3), "engine_ms": round(med["engine"], 3),
                     "sync_vs_gluon": round(med["sync"] / med["gluon"], 2)})
    if comm.rank == 0:
        settings = {k: os.environ.get(k) for k in ("HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY",
                                                  "HOROVOD_FUSION_THRESHOLD", "OMP_NUM_THREADS")}
        print("settings:", settings)
        print(f"sync layers' engine: {'Gloo' if comm.engine else 'none'}")
        print("layer | per-worker shape | gluon ms | sync ms | 2 Horovod all-reduces ms | "
              "2 engine all-reduces ms | sync/gluon")
        for r in rows:
            print(f"{r['layer']} | {tuple(r['shape'])} | {r['gluon_ms']} | {r['sync_ms']} | "
                  f"{r['collectives_ms']} | {r['engine_ms']} | {r['sync_vs_gluon']}")
        tot = {k: sum(r[k] for r in rows) for k in ("gluon_ms", "sync_ms", "collectives_ms", "engine_ms")}
        print("all four layers: gluon %.2f ms, sync %.2f ms; their collectives alone: through "
              "Horovod %.2f ms, through the engine %.2f ms"
              % (tot["gluon_ms"], tot["sync_ms"], tot["collectives_ms"], tot["engine_ms"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": settings, "rows": rows, "totals": tot}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
