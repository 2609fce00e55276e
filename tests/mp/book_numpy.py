"""The book's current edition (d2l 1.0, MXNet tab) in numpy mode: its LeNet with batch norm,
``BatchNorm(num_features, num_dims)`` swapped for distbn.SyncBatchNorm, trained on real
Fashion-MNIST as the book does (``npx.set_np()``, ``mx.np`` arrays, hybridized, lr 1.0), on
every worker (``horovodrun -np N`` or plain python). Checks that it learns (the loss of the
last steps well below the first's, test accuracy well above chance) and that every worker
ends with the same parameters and running statistics.
"""
import sys

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, np, npx

npx.set_np()
import distbn  # noqa: E402
from distbn.comm import get_comm  # noqa: E402
from distbn.data import ShardSampler, load_fashion_mnist  # noqa: E402

STEPS, GLOBAL_BATCH = 60, 128


def lenet():  # the book's net, section "Batch Normalization", with the synced layer
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, kernel_size=5), distbn.SyncBatchNorm(6, num_dims=4),
            gluon.nn.Activation("sigmoid"), gluon.nn.AvgPool2D(pool_size=2, strides=2),
            gluon.nn.Conv2D(16, kernel_size=5), distbn.SyncBatchNorm(16, num_dims=4),
            gluon.nn.Activation("sigmoid"), gluon.nn.AvgPool2D(pool_size=2, strides=2),
            gluon.nn.Dense(120), distbn.SyncBatchNorm(120, num_dims=2),
            gluon.nn.Activation("sigmoid"), gluon.nn.Dense(84),
            distbn.SyncBatchNorm(84, num_dims=2), gluon.nn.Activation("sigmoid"),
            gluon.nn.Dense(10))
    return net


def main():
    comm = get_comm()
    images, labels = load_fashion_mnist(train=True)
    n = STEPS * GLOBAL_BATCH
    x_all = np.array(images[:n, None].astype(onp.float32) / 255)
    y_all = np.array(labels[:n].astype(onp.float32))
    sampler = ShardSampler(n, comm.size, comm.rank, seed=0)
    loader = gluon.data.DataLoader(gluon.data.ArrayDataset(x_all, y_all),
                                   batch_size=GLOBAL_BATCH // comm.size, sampler=sampler)
    net = lenet()
    mx.random.seed(0)
    net.initialize(mx.init.Xavier())
    net(x_all[:2])
    net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 1.0})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for x, y in loader:
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(x.shape[0])
        assert isinstance(loss, np.ndarray), type(loss)
        losses.append(float(loss.mean()))
    first, last = onp.mean(losses[:5]), onp.mean(losses[-5:])
    test_x, test_y = load_fashion_mnist(train=False)
    pred = net(np.array(test_x[:1000, None].astype(onp.float32) / 255)).argmax(axis=1)
    acc = float((pred.astype("float32") == np.array(test_y[:1000].astype(onp.float32))).mean())
    flat = onp.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
    same = len({flat.tobytes() for flat in comm.allgather_object(flat)}) == 1
    ok = last < 0.7 * first and acc > 0.5 and same
    print(f"rank {comm.rank}/{comm.size} numpy LeNet: loss {first:.3f} -> {last:.3f}, "
          f"test acc {acc:.3f}, replicas identical {same}: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
