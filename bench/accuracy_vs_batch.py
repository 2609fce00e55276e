"""Accuracy vs per-worker batch: what sync BN is for.

    python bench/accuracy_vs_batch.py [--batches 4 8 16 32 64] [--seeds 0 1] [--workers 4]
                                      [--epochs 1] [--limit 12800] [--lr 0.1] [--json out.json]
    python bench/accuracy_vs_batch.py --quick      # batches 8 32, one seed, 3200 examples

For each per-worker batch b: `workers` workers with sync BN, the same with Gluon's local BN
(statistics over b examples), and one process on the global batch workers*b (sync BN at size
1 = plain BN over the global batch) -- same global batch, lr, epochs and seed. Prints test
accuracy per cell (mean and spread over seeds) and writes JSON; --plot writes a PNG (needs
matplotlib).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from runner import train
MODES = {"sync": ("sync", None), "local": ("gluon", None), "one process": ("sync", 1)}


def run(bn, workers, batch_global, seed, args):
    sets = {"model.bn": bn, "train.epochs": args.epochs, "train.batch_size": batch_global,
            "train.lr": args.lr, "train.seed": seed, "data.limit": args.limit}
    summary, _ = train(workers, sets)
    return summary["final"]["test_acc"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=12800)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.seeds, args.limit = [8, 32], [0], 3200
    cells = {}
    for b in args.batches:
        for mode, (bn, w) in MODES.items():
            for seed in args.seeds:
                acc = run(bn, w or args.workers, b * args.workers, seed, args)
                cells.setdefault((b, mode), []).append(acc)
                print(f"b={b} {mode} seed={seed}: test acc {acc:.4f}", file=sys.stderr, flush=True)
    print(f"test accuracy after {args.epochs} epoch(s) on {args.limit} examples, {args.workers} "
          f"workers, lr {args.lr}; mean (min-max over seeds {args.seeds})")
    print("per-worker batch | " + " | ".join(MODES))
    rows = []
    for b in args.batches:
        row = {"per_worker_batch": b, "global_batch": b * args.workers}
        text = []
        for mode in MODES:
            v = cells[(b, mode)]
            row[mode] = v
            text.append(f"{statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        rows.append(row)
        print(f"{b} | " + " | ".join(text))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        from plotting import line_chart
        vals = {mode: [cells[(b, mode)] for b in args.batches] for mode in MODES}
        line_chart(args.plot, args.batches,
                   {m: [statistics.mean(v) for v in vs] for m, vs in vals.items()},
                   f"per-worker batch ({args.workers} workers)", "test accuracy",
                   "LeNet / Fashion-MNIST: sync BN vs local BN", log2_x=True,
                   bands={m: ([min(v) for v in vs], [max(v) for v in vs]) for m, vs in vals.items()})

if __name__ == "__main__":
    sys.exit(main())
