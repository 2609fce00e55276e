"""Test accuracy per epoch with the running averages and with re-estimated BN statistics.

    python bench/precise_bn.py [--workers 1 2 4] [--seeds 0 1 2] [--epochs 5]
                               [--precise-bn 10240] [--limit N] [--json out.json] [--plot out.png]

The book's settings (configs/lenet_syncbn.yaml: LeNet with sync BN, lr 1.0, global batch 256),
trained as a user does (launch/local.sh). Each run evaluates every epoch twice on the same
weights: with the running averages (test_acc_ema) and after distbn.update_bn_stats over
``--precise-bn`` training examples of all workers (test_acc). The cost is the re-estimation's
time as a share of the epoch's training time, both measured in the same run.
"""
import argparse
import statistics
import sys

from report import emit
from runner import train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--precise-bn", type=int, default=10240)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    rows = []
    for workers in args.workers:
        for seed in args.seeds:
            sets = {"train.epochs": args.epochs, "train.seed": seed,
                    "train.precise_bn": args.precise_bn}
            if args.limit:
                sets["data.limit"] = args.limit
            _, epochs = train(workers, sets)
            for e in epochs:
                rows.append({"workers": workers, "seed": seed, "epoch": e["epoch"],
                             "test_acc_ema": e["test_acc_ema"], "test_acc": e["test_acc"],
                             "train_acc": round(e["train_acc"], 4),
                             "epoch_seconds": e["epoch_seconds"],
                             "precise_bn_seconds": e["precise_bn_seconds"],
                             "precise_bn_share": round(e["precise_bn_seconds"] / e["epoch_seconds"], 4)})
            print(" | ".join(f"w{workers} s{seed} e{r['epoch']}: {r['test_acc_ema']:.3f} -> "
                             f"{r['test_acc']:.3f}" for r in rows[-len(epochs):]), flush=True)
    summary = summarize(rows, args.workers, args.epochs)
    emit(summary, args.json, raw=rows, precise_bn=args.precise_bn, epochs=args.epochs,
         seeds=args.seeds)
    if args.plot:
        plot(rows, args)
    return 0


def summarize(rows, workers_list, epochs):
    """Per worker count: mean over seeds of each epoch's accuracies, the final one, the worst
    from epoch 2 on, and the median cost share."""
    out = []
    for workers in workers_list:
        mine = [r for r in rows if r["workers"] == workers]
        for key in ("test_acc_ema", "test_acc"):
            per_epoch = [statistics.mean(r[key] for r in mine if r["epoch"] == e)
                         for e in range(1, epochs + 1)]
            out.append({"workers": workers, "stats": key.replace("test_acc_ema", "running")
                        .replace("test_acc", "re-estimated"),
                        "per_epoch_mean": [round(a, 4) for a in per_epoch],
                        "final_mean": round(per_epoch[-1], 4),
                        "worst_from_epoch_2": round(min((r[key] for r in mine if r["epoch"] >= 2),
                                                       default=float("nan")), 4),
                        "cost_share_median": statistics.median(r["precise_bn_share"] for r in mine)})
    return out


def plot(rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.workers), figsize=(4 * len(args.workers), 3.6),
                             sharey=True, squeeze=False)
    epochs = list(range(1, args.epochs + 1))
    for ax, workers in zip(axes[0], args.workers):
        for seed in args.seeds:
            mine = sorted((r for r in rows if r["workers"] == workers and r["seed"] == seed),
                          key=lambda r: r["epoch"])
            ax.plot(epochs, [r["test_acc_ema"] for r in mine], color="tab:red", alpha=0.7,
                    marker="o", label="running averages" if seed == args.seeds[0] else None)
            ax.plot(epochs, [r["test_acc"] for r in mine], color="tab:blue", alpha=0.7,
                    marker="s", label="re-estimated" if seed == args.seeds[0] else None)
        ax.axhline(0.864, color="grey", linestyle=":", label="book, 5 epochs")
        ax.set_title(f"{workers} worker{'s' if workers > 1 else ''}, {len(args.seeds)} seeds")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"LeNet, book settings: running BN averages vs update_bn_stats "
                 f"({args.precise_bn} examples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
