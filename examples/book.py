"""The book's batch norm (Dive into Deep Learning, 8.5) three ways, side by side: the
from-scratch function, the book's layer ``BatchNorm(num_features, num_dims)``, and the synced
layer, in the book's LeNet. In one process all three compute the same thing; under horovodrun
the synced layer's statistics are those of every worker's batch together.

    python examples/book.py
    horovodrun -np 2 python examples/book.py
"""
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, init, nd

import distbn


class BookBatchNorm(gluon.nn.Block):
    """The book's layer around the from-scratch function ``distbn.batch_norm``."""

    def __init__(self, num_features, num_dims, **kwargs):
        super().__init__(**kwargs)
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = self.params.get("gamma", shape=shape, init=init.One())
        self.beta = self.params.get("beta", shape=shape, init=init.Zero())
        self.moving_mean = nd.zeros(shape)
        self.moving_var = nd.ones(shape)

    def forward(self, X):
        Y, self.moving_mean, self.moving_var = distbn.batch_norm(
            X, self.gamma.data(), self.beta.data(), self.moving_mean, self.moving_var,
            eps=1e-5, momentum=0.9)
        return Y


def lenet(bn):
    """The book's LeNet with batch norm; ``bn(num_features, num_dims)`` makes each BN layer."""
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Conv2D(6, kernel_size=5), bn(6, 4), gluon.nn.Activation("sigmoid"),
            gluon.nn.AvgPool2D(pool_size=2, strides=2),
            gluon.nn.Conv2D(16, kernel_size=5), bn(16, 4), gluon.nn.Activation("sigmoid"),
            gluon.nn.AvgPool2D(pool_size=2, strides=2), gluon.nn.Dense(120), bn(120, 2),
            gluon.nn.Activation("sigmoid"), gluon.nn.Dense(84), bn(84, 2),
            gluon.nn.Activation("sigmoid"), gluon.nn.Dense(10))
    mx.random.seed(0)
    net.initialize(init.Xavier())
    return net


def main():
    comm = distbn.get_comm()  # rank and size (Horovod when launched by horovodrun)
    kinds = {"from scratch": BookBatchNorm, "distbn.BatchNorm": distbn.BatchNorm,
             "distbn.SyncBatchNorm": distbn.SyncBatchNorm}
    # Every worker draws the same global batch and keeps its slice.
    x = nd.array(np.random.RandomState(0).rand(8 * comm.size, 1, 28, 28))
    mine = x[8 * comm.rank:8 * (comm.rank + 1)]
    outputs = {}
    for name, bn in kinds.items():
        net = lenet(bn)
        with autograd.record():  # training mode: batch statistics
            outputs[name] = net(mine)
    for name, y in outputs.items():
        diff = np.abs(y.asnumpy() - outputs["from scratch"].asnumpy()).max()
        print(f"rank {comm.rank}/{comm.size} {name}: max |y - from scratch| = {diff:.2e}",
              flush=True)


if __name__ == "__main__":
    main()
