"""What model.bn_group does to speed and accuracy: sync BN over all workers, within groups of K
consecutive ranks, or none (K = 1: each worker's own statistics).

    python bench/bn_group.py [--workers 4] [--groups 1 2 4] [--batch 8] [--seeds 0 1 2]
                             [--epochs 1] [--limit 12800] [--lr 0.1] [--json out.json]
    python bench/bn_group.py --quick      # one seed, 3200 examples

Every cell trains LeNet with the trainer (`launch/local.sh`, its thread settings) at the same
global batch (workers * --batch), lr, epochs and seed; only model.bn_group changes. The
group sizes take turns within each seed, so a drifting machine load hits all alike. Prints,
per group size, test accuracy (mean, min-max over seeds) and training examples per second
(median over the seeds' epochs; the first epoch included, as a user's run has it).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from runner import train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=8, help="per worker")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=12800)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.limit = [0], 3200
    cells = {k: {"test_acc": [], "examples_per_second": []} for k in args.groups}
    for seed in args.seeds:
        for k in args.groups:
            sets = {"model.bn": "sync", "model.bn_group": k, "train.epochs": args.epochs,
                    "train.batch_size": args.batch * args.workers, "train.lr": args.lr,
                    "train.seed": seed, "data.limit": args.limit}
            summary, epochs = train(args.workers, sets)
            cells[k]["test_acc"].append(summary["final"]["test_acc"])
            cells[k]["examples_per_second"] += [e["examples_per_second"] for e in epochs]
            print(f"bn_group={k} seed={seed}: test acc {summary['final']['test_acc']:.4f}, "
                  f"{statistics.median(e['examples_per_second'] for e in epochs):.0f} examples/s",
                  file=sys.stderr, flush=True)
    print(f"LeNet, {args.workers} workers, {args.batch} examples per worker, {args.epochs} "
          f"epoch(s) on {args.limit} examples, lr {args.lr}, seeds {args.seeds}")
    print("bn_group | statistics over | test accuracy mean (min-max) | examples/s (median)")
    rows = []
    for k in args.groups:
        acc, speed = cells[k]["test_acc"], cells[k]["examples_per_second"]
        rows.append({"bn_group": k, "examples_per_statistic": k * args.batch, **cells[k]})
        print(f"{k} | {k * args.batch} examples | {statistics.mean(acc):.4f} "
              f"({min(acc):.4f}-{max(acc):.4f}) | {statistics.median(speed):.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
