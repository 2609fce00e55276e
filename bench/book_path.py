"""distbn.train against the book's own code path, one process, same hyper-parameters.

    python bench/book_path.py [--epochs 5] [--repeat 1] [--json out.json]
    python bench/book_path.py --quick            # 1 epoch
    (needs d2l: .venv/bin/python -m pip install -c constraints.txt -e ".[book]")

The book's path: LeNet with Gluon's nn.BatchNorm (the chapter's second variant), not
hybridized, fed by d2l's Fashion-MNIST loader (`d2l.FashionMNIST(batch_size).get_dataloader`:
MXNet's FashionMNIST dataset, Resize + ToTensor, a DataLoader with d2l's 4 worker processes),
trained by the chapter's loop (record, loss, backward, `trainer.step(batch_size)`, then the
loss and accuracy sums read back every batch). Xavier init, SGD lr 1.0, batch 256.

distbn's path: `python -m distbn.train` through launch/local.sh with the same settings,
`model.bn=gluon` (the same network) and `model.bn=sync` (the default config).

Both run under launch/env.sh's thread settings for one worker and time the training loop of
each epoch (test evaluation excluded); the table gives the median examples/s over epochs 2..N
(epoch 1 includes warm-up; with one epoch, epoch 1), the final test accuracy and the ratio to
the book's path. Offline: MXNet's FashionMNIST would download its mirror's gz files (other
bytes than the official ones); here it reads gz files rebuilt from the verified local copy
(distbn.data checks the decompressed SHA-256), the same content d2l would get.
"""
import argparse
import gzip
import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import ROOT, train

HYPER = {"lr": 1.0, "batch_size": 256, "seed": 0}
IDX_NAMES = {True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def write_idx_gz(root):
    """The verified local Fashion-MNIST as IDX gz files under ``root`` (what MXNet's dataset
    reads). Returns {file name: SHA-1 of the gz bytes} for MXNet's download check."""
    from distbn.data import IMAGE_MAGIC, LABEL_MAGIC, load_fashion_mnist

    sha1 = {}
    for train_split, (img_name, lbl_name) in IDX_NAMES.items():
        images, labels = load_fashion_mnist(train=train_split)
        for name, arr, magic in ((img_name, images, IMAGE_MAGIC), (lbl_name, labels, LABEL_MAGIC)):
            header = struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape)
            data = gzip.compress(header + arr.tobytes(), compresslevel=1, mtime=0)
            (Path(root) / name).write_bytes(data)
            sha1[name] = hashlib.sha1(data).hexdigest()
    return sha1


def use_local_fashion_mnist(root, sha1):
    """Make ``gluon.data.vision.FashionMNIST`` (which d2l calls) read ``root`` without a
    download: MXNet skips the download when a file exists with the expected SHA-1."""
    from mxnet.gluon.data import vision

    class LocalFashionMNIST(vision.FashionMNIST):
        def __init__(self, root=str(root), train=True, transform=None):
            super().__init__(root=root, train=train, transform=transform)

        def _get_data(self):
            for attr, name in (("_train_data", IDX_NAMES[True][0]), ("_train_label", IDX_NAMES[True][1]),
                               ("_test_data", IDX_NAMES[False][0]), ("_test_label", IDX_NAMES[False][1])):
                setattr(self, attr, (name, sha1[name]))
            super()._get_data()

    vision.FashionMNIST = LocalFashionMNIST


def book_run(epochs):
    """The book's path in this process. Returns one record per epoch."""
    import mxnet as mx
    from mxnet import autograd, gluon, init
    from d2l import mxnet as d2l
    from distbn.models import lenet

    with tempfile.TemporaryDirectory() as root:
        use_local_fashion_mnist(root, write_idx_gz(root))
        data = d2l.FashionMNIST(batch_size=HYPER["batch_size"])
        train_iter, test_iter = data.get_dataloader(True), data.get_dataloader(False)
        mx.random.seed(HYPER["seed"])
        net = lenet("gluon")  # the chapter's layout with nn.BatchNorm; the book does not hybridize
        net.initialize(init.Xavier())
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": HYPER["lr"]})
        records = []
        for epoch in range(1, epochs + 1):
            loss_sum, correct, count, t0 = 0.0, 0.0, 0, time.perf_counter()
            for X, y in train_iter:
                with autograd.record():
                    y_hat = net(X)
                    loss = loss_fn(y_hat, y).sum()
                loss.backward()
                trainer.step(HYPER["batch_size"])
                loss_sum += loss.asscalar()
                correct += (y_hat.argmax(axis=1) == y.astype("float32")).sum().asscalar()
                count += y.size
            seconds = time.perf_counter() - t0
            test_correct = test_count = 0
            for X, y in test_iter:
                test_correct += (net(X).argmax(axis=1) == y.astype("float32")).sum().asscalar()
                test_count += y.size
            records.append({"epoch": epoch, "train_loss": loss_sum / count, "train_acc": correct / count,
                            "test_acc": test_correct / test_count, "epoch_seconds": seconds,
                            "examples_per_second": count / seconds})
            print(f"book epoch {epoch}: {records[-1]}", file=sys.stderr, flush=True)
        return records


def book_subprocess(epochs):
    """book_run in a fresh python under launch/env.sh for one worker (as distbn.train gets)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "book.json"
        script = (f'. "{ROOT}/launch/env.sh"; exec "{sys.executable}" "{Path(__file__).resolve()}" '
                  f'--book-worker --epochs {epochs} --json "{out}"')
        proc = subprocess.run(["bash", "-c", script], env={**os.environ, "DISTBN_LOCAL_WORKERS": "1"},
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"book path failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def steady_rate(records):
    """Median examples/s over epochs 2..N (epoch 1 pays the warm-up), or epoch 1 alone."""
    rates = [r["examples_per_second"] for r in records]
    return statistics.median(rates[1:] or rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch")
    ap.add_argument("--json")
    ap.add_argument("--book-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.epochs = 1
    if args.book_worker:
        Path(args.json).write_text(json.dumps(book_run(args.epochs)))
        return 0
    sets = {"train.epochs": args.epochs, "train.lr": HYPER["lr"],
            "train.batch_size": HYPER["batch_size"], "train.seed": HYPER["seed"]}
    paths = {"book (d2l loader, Gluon BN)": lambda: book_subprocess(args.epochs),
             "distbn.train bn=gluon": lambda: train(1, {**sets, "model.bn": "gluon"})[1],
             "distbn.train bn=sync": lambda: train(1, {**sets, "model.bn": "sync"})[1]}
    runs = {name: [] for name in paths}
    for r in range(args.repeat):  # interleaved: the machine's load hits every path alike
        for name, fn in paths.items():
            runs[name].append(fn())
            print(f"[{r + 1}/{args.repeat}] {name}: {steady_rate(runs[name][-1]):.0f} ex/s",
                  file=sys.stderr, flush=True)
    book = statistics.median(steady_rate(rec) for rec in runs[next(iter(paths))])
    rows = []
    print(f"one process, {args.epochs} epoch(s), lr {HYPER['lr']}, batch {HYPER['batch_size']}, "
          f"OMP_NUM_THREADS from launch/env.sh ({os.cpu_count()} cores)")
    print("path | examples/s | ratio to book | final train loss | final test acc")
    for name, recs in runs.items():
        rate = statistics.median(steady_rate(rec) for rec in recs)
        row = {"path": name, "examples_per_s": round(rate, 1), "ratio_to_book": round(rate / book, 3),
               "final_train_loss": [rec[-1]["train_loss"] for rec in recs],
               "final_test_acc": [rec[-1]["test_acc"] for rec in recs]}
        rows.append(row)
        print(f"{name} | {rate:.0f} | {rate / book:.2f} | "
              f"{', '.join(f'{v:.4f}' for v in row['final_train_loss'])} | "
              f"{', '.join(f'{v:.4f}' for v in row['final_test_acc'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "raw": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
