"""Revert and export after synced training (``horovodrun -np N`` or plain python), OUT_DIR given.

The global batch of 16 examples is split evenly over the workers; three SGD steps with
SyncBatchNorm (one process: the same 16 examples). Then on each worker: the prediction of a
fixed batch before and after ``revert_sync_batchnorm`` agree; ``distbn.export`` writes
OUT_DIR/rank{R}/model-*; and, as the negative control, the same network traced without the
revert (what ``net.export`` holds at several workers) goes to OUT_DIR/rank{R}/naive-symbol.json.
"""
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import distbn
from distbn.comm import get_comm
from distbn.export import export


def build():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2), distbn.SyncBatchNorm(4, num_dims=4),
            gluon.nn.Activation("sigmoid"), gluon.nn.Flatten(), gluon.nn.Dense(6, in_units=144),
            distbn.SyncBatchNorm(6, scale=False), gluon.nn.Dense(3, in_units=6))
    return net


def main():
    out = Path(sys.argv[1])
    comm = get_comm()
    mx.random.seed(0)
    net = build()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    distbn.broadcast_parameters(net)
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    rs = np.random.RandomState(0)
    per = 16 // comm.size
    for _ in range(3):
        batch = 1 + 2 * rs.randn(16, 2, 8, 8)
        x = mx.nd.array(batch[comm.rank * per:(comm.rank + 1) * per])
        with autograd.record():
            loss = net(x).square().mean()
        loss.backward()
        trainer.step(16)
    probe = mx.nd.array(rs.randn(5, 2, 8, 8))
    before = net(probe).asnumpy()
    folder = out / f"rank{comm.rank}"
    folder.mkdir(parents=True, exist_ok=True)
    net(mx.sym.var("data")).save(str(folder / "naive-symbol.json"))
    export(net, folder / "model", (1, 2, 8, 8))
    distbn.revert_sync_batchnorm(net)
    after = net(probe).asnumpy()
    diff = float(np.abs(after - before).max() / np.abs(before).max())
    print(f"rank {comm.rank}/{comm.size}: prediction after the revert differs by {diff:.1e}")
    if diff > 1e-5:
        sys.exit(f"rank {comm.rank}: the revert changed the prediction ({diff:.1e})")


if __name__ == "__main__":
    main()
