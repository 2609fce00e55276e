"""Training-step time of the same network in MXNet's numpy mode against legacy NDArrays.

    python bench/numpy_mode.py                                  # one process
    horovodrun -np 2 -H localhost:2 python bench/numpy_mode.py  # 2 workers (Gloo)
    python bench/numpy_mode.py --arch resnet18_v1 --bn sync --rounds 9 --json out.json

Two copies of a network (same initial values), one built and run in numpy mode
(``npx.set_np()``: mx.np arrays, Gluon's np layers, distbn's layers on legacy views), one with
legacy NDArrays, both hybridized with static_alloc and static_shape. They take turns: each
round runs --steps steps of each (the mode switched around each turn), waited for step by
step, so a drifting load hits both alike. Reported: median step time per mode, the ratio of
medians and the median of per-round ratios (numpy / legacy), rank 0's clock.
"""
import argparse
import statistics

import mxnet as mx
from mxnet.util import np_array, np_shape

from distbn.comm import get_comm
from distbn.models import build, finish_shapes
from report import emit
from step_time import run_steps

DEFAULT_BATCH = {"lenet": 256, "resnet18_v1": 64}


def make(arch, bn, comm, batch, numpy):
    """A network, trainer and one batch, built inside the mode it will run in."""
    with np_shape(numpy), np_array(numpy):
        array = mx.np if numpy else mx.nd
        mx.random.seed(0)
        net = build(arch, bn)
        net.initialize(mx.init.Xavier())
        net.hybridize(static_alloc=True, static_shape=True)
        finish_shapes(net, array.zeros((batch, 1, 28, 28)))
        comm.broadcast_parameters(net.collect_params(), prefix=f"bench.{arch}.{numpy}")
        trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
        x = array.random.uniform(0, 1, (batch, 1, 28, 28))  # positional: both spell it so
        y = array.array([i % 10 for i in range(batch)], dtype="float32")
    return net, trainer, x, y


def steps(net, trainer, x, y, n, numpy) -> list:
    """Seconds of each of ``n`` training steps, in the network's mode."""
    with np_shape(numpy), np_array(numpy):
        return run_steps(net, trainer, x, y, n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["lenet"])
    ap.add_argument("--bn", default="sync")
    ap.add_argument("--global-batch", type=int)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    rows = []
    for arch in args.arch:
        batch = (args.global_batch or DEFAULT_BATCH.get(arch, 64)) // comm.size
        nets = {mode: make(arch, args.bn, comm, batch, mode == "numpy") for mode in ("legacy", "numpy")}
        for mode, (net, tr, x, y) in nets.items():
            steps(net, tr, x, y, args.warmup, mode == "numpy")
        per_round = {"legacy": [], "numpy": []}
        for _ in range(args.rounds):
            for mode, (net, tr, x, y) in nets.items():
                per_round[mode].append(statistics.median(steps(net, tr, x, y, args.steps,
                                                               mode == "numpy")))
        legacy, numpy = (statistics.median(per_round[m]) for m in ("legacy", "numpy"))
        ratios = [n / l for n, l in zip(per_round["numpy"], per_round["legacy"])]
        rows.append({"arch": arch, "bn": args.bn, "workers": comm.size, "batch_per_worker": batch,
                     "legacy_ms": round(1e3 * legacy, 3), "numpy_ms": round(1e3 * numpy, 3),
                     "numpy_vs_legacy": round(numpy / legacy, 3),
                     "median_round_ratio": round(statistics.median(ratios), 3)})
    if comm.rank == 0:
        emit(rows, args.json, rounds=args.rounds, steps=args.steps)


if __name__ == "__main__":
    main()
