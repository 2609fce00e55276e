"""Several devices in one process, the book's multi-GPU way (and GluonCV's), with sync BN over
every device of every worker: the book's LeNet with distbn.SyncBatchNorm on Fashion-MNIST.

    python examples/devices.py --devices 2 --steps 30               # one process, 2 devices
    horovodrun -np 2 python examples/devices.py --devices 2         # 2 workers x 2 devices

Each step splits the batch over the devices (``gluon.utils.split_and_load``), runs a forward
pass on each inside one ``autograd.record()``, then ``for l in losses: l.backward()`` (the
book's ``train_batch``). The devices here are ``mx.cpu(0)``, ``mx.cpu(1)``: MXNet runs them
side by side as it would GPUs. Two things differ from one device:
  * BN's statistics are those of the global batch: the layer's parameters live on every
    device and the devices meet inside its exchange (docs/layer.md, "Several devices").
  * the trainer: ``distbn.get_comm().trainer(...)`` sums each parameter's gradients over the
    devices before Horovod's all-reduce (horovod.mxnet's DistributedTrainer reduces the first
    device's only); in one process it is Gluon's, whose kvstore sums them.
On the CPU, MXNet's devices share one pool of temporary space: it needs more copies than the
default 4 (more than the operators of one device's training graph that take one: this LeNet
stops at 64 and trains at 256), set before MXNet starts (below), or the devices' exchange
stops with an error that says so. GPUs have a pool each.
"""
import os

os.environ.setdefault("MXNET_CPU_TEMP_COPY", "256")  # before MXNet starts: see above

import argparse  # noqa: E402

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402

import distbn  # noqa: E402
from distbn.data import ShardSampler, load_fashion_mnist  # noqa: E402
from distbn.models import lenet  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2, help="CPU devices of this process")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64, help="examples per worker and step")
    ap.add_argument("--lr", type=float, default=0.9)
    args = ap.parse_args()
    comm = distbn.get_comm()
    ctx = [mx.cpu(i) for i in range(args.devices)]

    net = lenet("sync")  # the book's LeNet, distbn.SyncBatchNorm after each layer
    mx.random.seed(0)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(nd.zeros((1, 1, 28, 28), ctx=ctx[0]))  # deferred shapes (prediction: no exchange)
    net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)  # every worker (and so every device) from rank 0's values
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": args.lr})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    images, labels = load_fashion_mnist(train=True)
    images = images[:, None].astype(np.float32) / 255
    sampler = ShardSampler(len(labels), comm.size, comm.rank, seed=1)
    order = iter(sampler)
    for step in range(1, args.steps + 1):
        idx = [next(order) for _ in range(args.batch)]
        Xs = gluon.utils.split_and_load(nd.array(images[idx]), ctx, even_split=False)
        ys = gluon.utils.split_and_load(nd.array(labels[idx]), ctx, even_split=False)
        with autograd.record():
            losses = [loss_fn(net(X), y) for X, y in zip(Xs, ys)]
        for loss in losses:
            loss.backward()
        trainer.step(args.batch)  # workers averaged (Horovod), then / this worker's batch
        if step % 10 == 0 or step == args.steps:
            mean = sum(loss.sum().asscalar() for loss in losses) / args.batch
            print(f"rank {comm.rank} step {step}: loss {mean:.4f}", flush=True)
    # Every device of every worker holds the same parameters and running statistics.
    spread = max(float(np.abs(p.data(c).asnumpy() - p.data(ctx[0]).asnumpy()).max())
                 for p in net.collect_params().values() for c in ctx)
    print(f"rank {comm.rank}/{comm.size} devices={args.devices}: largest difference between "
          f"devices {spread:.3g}", flush=True)


if __name__ == "__main__":
    main()
