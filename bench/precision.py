"""Training-step time in float32 and in bfloat16 (MXNet's AMP, as ``train.precision: bfloat16``
runs it), side by side, for networks with synced BN.

    python bench/precision.py                                  # one process
    horovodrun -np 2 -H localhost:2 python bench/precision.py  # 2 workers (Gloo)
    python bench/precision.py --arch resnet18_v1 --rounds 9 --json out.json

Both networks live in one process: the float32 one is built and its graph traced before
``amp.init("bfloat16")``, the bfloat16 one after (as the trainer does), so their steps can
alternate: each round runs --steps steps of each, waited for step by step (forward,
backward, trainer step). Reported as in bench/step_time.py: median step time per precision
over all rounds, the ratio of medians, the median of the per-round ratios, rank 0's clock.
"""
import argparse
import statistics

import numpy as np
from mxnet import nd
from mxnet.contrib import amp

from distbn.comm import get_comm
from report import emit
from step_time import DEFAULT_BATCH, make, run_steps

KINDS = ("float32", "bfloat16")


def data(comm, batch):
    rs = np.random.RandomState(comm.rank)
    return nd.array(rs.rand(batch, 1, 28, 28)), nd.array(rs.randint(0, 10, batch))


def measure(arch, bn, nets, comm, batch, rounds, steps):
    x, y = data(comm, batch)
    samples = {k: [] for k in KINDS}
    per_round = []
    for _ in range(rounds):
        med = {}
        for k in KINDS:
            t = run_steps(*nets[k], x, y, steps)
            samples[k] += t
            med[k] = statistics.median(t)
        per_round.append(med["bfloat16"] / med["float32"])
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"arch": arch, "bn": bn, "workers": comm.size, "batch_per_worker": batch, "rounds": rounds,
            "steps_per_round": steps, **{f"{k}_ms": round(ms[k], 2) for k in KINDS},
            "bfloat16_vs_float32": round(ms["bfloat16"] / ms["float32"], 3),
            "bfloat16_vs_float32_round_median": round(statistics.median(per_round), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["lenet", "resnet18_v1"])
    ap.add_argument("--bn", default="sync")
    ap.add_argument("--global-batch", type=int, help="default: 256 for lenet, 64 otherwise")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per precision and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    batch = {a: (args.global_batch or DEFAULT_BATCH.get(a, 64)) // comm.size for a in args.arch}
    nets = {a: {} for a in args.arch}
    for kind in KINDS:
        if kind == "bfloat16":
            amp.init(target_dtype="bfloat16")  # the float32 graphs are traced already
        for a in args.arch:
            nets[a][kind] = make(a, args.bn, comm, batch[a])
            run_steps(*nets[a][kind], *data(comm, batch[a]), args.warmup)
    rows = [measure(a, args.bn, nets[a], comm, batch[a], args.rounds, args.steps) for a in args.arch]
    if comm.rank == 0:
        emit(rows, args.json)


if __name__ == "__main__":
    main()
