"""Training throughput: examples/s of `python -m distbn.train` for model.bn in {gluon, custom,
sync} at 1, 2 and 4 workers on this machine, side by side (interleaved repeats, medians).

    python bench/throughput.py [--workers 1 2 4] [--bn gluon custom sync] [--limit 15360]
                               [--repeat 2] [--env HOROVOD_CYCLE_TIME=0 ...] [--json out.json]

Each run trains one epoch on the first --limit training examples at the book's global batch
of 256 and reads examples/s and epoch seconds from the run's summary.json. Threads per worker:
cores / workers (launch/env.sh). Reports sync/gluon and sync/custom step-time ratios at each
worker count.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from runner import train


def run_once(bn, workers, args, extra_env):
    sets = {"model.bn": bn, "train.epochs": 1, "data.limit": args.limit, "data.test_limit": 1000}
    summary, _ = train(workers, sets, env=extra_env, timeout=1800)
    return summary["final"]["examples_per_second"], summary["final"]["epoch_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--bn", nargs="+", default=["gluon", "custom", "sync"])
    ap.add_argument("--limit", type=int, default=15360)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for every run")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG of examples/s against workers (needs matplotlib)")
    args = ap.parse_args()
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    results = {}
    for r in range(args.repeat):
        for w in args.workers:
            for bn in args.bn:
                eps, sec = run_once(bn, w, args, extra_env)
                results.setdefault((bn, w), []).append((eps, sec))
                print(f"[{r + 1}/{args.repeat}] bn={bn} workers={w}: {eps:.0f} ex/s, {sec:.2f} s",
                      file=sys.stderr, flush=True)
    rows = []
    for w in args.workers:
        med = {bn: statistics.median(e for e, _ in results[(bn, w)]) for bn in args.bn}
        row = {"workers": w, **{f"{bn}_examples_per_s": round(med[bn], 1) for bn in args.bn}}
        # step time ratio = inverse throughput ratio at equal global batch
        for base in ("gluon", "custom"):
            if "sync" in med and base in med:
                row[f"sync_step_vs_{base}"] = round(med[base] / med["sync"], 3)
        rows.append(row)
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))
    print(f"threads per worker: cores/workers (nproc={os.cpu_count()}); env {extra_env or 'launch/env.sh defaults'}")
    if args.json:
        raw = {f"{bn}x{w}": v for (bn, w), v in results.items()}
        Path(args.json).write_text(json.dumps({"rows": rows, "limit": args.limit,
                                               "env": extra_env, "raw": raw}, indent=1))
    if args.plot:
        from plotting import line_chart
        line_chart(args.plot, args.workers,
                   {bn: [r[f"{bn}_examples_per_s"] for r in rows] for bn in args.bn},
                   f"workers (on {os.cpu_count()} cores)", "examples / s",
                   "LeNet training throughput, global batch 256")

if __name__ == "__main__":
    sys.exit(main())
