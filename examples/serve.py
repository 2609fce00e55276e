"""Serve a distbn-trained network without distbn or Horovod: classify Fashion-MNIST's test images
from a run's ``export/`` folder (what ``python -m distbn.train`` writes when it ends).

    .venv/bin/python examples/serve.py RUN_DIR/export --backend mxnet
    launch/serve_env.sh && .venv-serve/bin/python examples/serve.py RUN_DIR/export --backend onnxruntime

``mxnet``: ``SymbolBlock.imports`` of model-symbol.json / model-0000.params (plain MXNet);
``onnxruntime``: model.onnx, in an environment that has no MXNet at all. Prints the accuracy
on the first ``--limit`` test images (the run's ``data.test_limit``, all 10,000 by default),
which equals the run's final ``test_acc`` on the same images.
"""
import argparse
import gzip
import hashlib
import os
import sys
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """An idx file of Fashion-MNIST (gzip-compressed or raw), as an array of uint8."""
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def test_set(data_dir: Path, limit: int):
    def find(name):
        for candidate in (data_dir / f"{name}.gz", data_dir / name):
            if candidate.is_file():
                return candidate
        sys.exit(f"serve: no {name}(.gz) in {data_dir} (--data-dir or DISTBN_DATA_DIR)")
    images = read_idx(find("t10k-images-idx3-ubyte"))[:limit or None]
    labels = read_idx(find("t10k-labels-idx1-ubyte"))[:limit or None]
    # As the trainer feeds them: (N, 1, 28, 28) float32 in [0, 1].
    return images[:, None].astype(np.float32) / np.float32(255), labels


def default_data_dir() -> Path:
    candidates = [os.environ.get("DISTBN_DATA_DIR"), "~/.cache/distbn/fashion-mnist",
                  "/usr/share/datasets/fashion-mnist"]
    for c in filter(None, candidates):
        if (Path(c).expanduser() / "t10k-labels-idx1-ubyte.gz").is_file() or \
                (Path(c).expanduser() / "t10k-labels-idx1-ubyte").is_file():
            return Path(c).expanduser()
    sys.exit("serve: Fashion-MNIST's test set is in none of " + ", ".join(filter(None, candidates))
             + " (--data-dir)")


def check_files(export_dir: Path) -> None:
    """Every file model.sha256 lists has its checksum (a damaged copy is named, not served)."""
    for line in (export_dir / "model.sha256").read_text().splitlines():
        digest, name = line.split(None, 1)
        if hashlib.sha256((export_dir / name).read_bytes()).hexdigest() != digest:
            sys.exit(f"serve: {export_dir / name} differs from its checksum in model.sha256")


def mxnet_predictor(export_dir: Path):
    import warnings
    import mxnet as mx
    warnings.filterwarnings("ignore", "Cannot decide type")  # the input's: float32, given below
    net = mx.gluon.SymbolBlock.imports(str(export_dir / "model-symbol.json"), ["data"],
                                       str(export_dir / "model-0000.params"))
    return lambda x: net(mx.nd.array(x)).asnumpy()


def onnxruntime_predictor(export_dir: Path):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir", type=Path, help="a run's export/ folder")
    ap.add_argument("--backend", choices=["mxnet", "onnxruntime"], default="mxnet")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="Fashion-MNIST's folder (default: the first of $DISTBN_DATA_DIR, "
                         "~/.cache/distbn/fashion-mnist, /usr/share/datasets/fashion-mnist "
                         "that holds it: where the install put it)")
    ap.add_argument("--limit", type=int, default=0, help="the first N test images (0: all)")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)
    check_files(args.export_dir)
    predict = {"mxnet": mxnet_predictor, "onnxruntime": onnxruntime_predictor}[args.backend](
        args.export_dir)
    x, y = test_set(args.data_dir or default_data_dir(), args.limit)
    correct = sum(int((predict(x[i:i + args.batch_size]).argmax(axis=1) == y[i:i + args.batch_size]).sum())
                  for i in range(0, len(x), args.batch_size))
    loaded = sorted(m for m in ("distbn", "horovod", "mxnet") if m in sys.modules)
    print(f"{args.backend}: accuracy {correct / len(x):.6f} ({correct} of {len(x)} test images); "
          f"modules loaded: {', '.join(loaded) or 'none of distbn, horovod, mxnet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
