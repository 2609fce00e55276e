"""A network written in GluonCV's manner takes distbn.SyncBatchNorm as its ``norm_layer``.

    horovodrun -np 2 python examples/gluoncv_style.py --steps 20

GluonCV's networks (e.g. ``gluoncv.model_zoo.get_model("resnet50_v1b", norm_layer=...,
norm_kwargs=...)``) take the class of their BN layers and the keywords to build them with;
its training scripts pass ``mx.gluon.contrib.nn.SyncBatchNorm`` with
``norm_kwargs={"num_devices": N}`` for --syncbn, which syncs the GPUs of one process only.
``distbn.SyncBatchNorm`` takes the same keywords (``num_devices``: the devices of each process,
one here, checked against the parameters' contexts) and syncs every device of every worker. GluonCV itself is not needed
here: the blocks below are written the way GluonCV writes its ResNet-V1b blocks.
"""
import argparse

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

import distbn
from distbn.data import load_fashion_mnist


class BasicBlock(gluon.HybridBlock):
    """A residual block in GluonCV's manner: norm_layer and norm_kwargs come from outside."""

    def __init__(self, channels, stride, norm_layer=gluon.nn.BatchNorm, norm_kwargs=None,
                 **kwargs):
        super().__init__(**kwargs)
        norm_kwargs = norm_kwargs or {}
        self.body = gluon.nn.HybridSequential()
        self.body.add(gluon.nn.Conv2D(channels, 3, stride, 1, use_bias=False),
                      norm_layer(**norm_kwargs), gluon.nn.Activation("relu"),
                      gluon.nn.Conv2D(channels, 3, 1, 1, use_bias=False),
                      norm_layer(gamma_initializer="zeros", **norm_kwargs))
        self.down = gluon.nn.HybridSequential()
        self.down.add(gluon.nn.Conv2D(channels, 1, stride, use_bias=False),
                      norm_layer(**norm_kwargs))

    def hybrid_forward(self, F, x):
        return F.relu(self.body(x) + self.down(x))


class SmallResNet(gluon.HybridBlock):
    def __init__(self, classes=10, norm_layer=gluon.nn.BatchNorm, norm_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        self.features = gluon.nn.HybridSequential()
        self.features.add(gluon.nn.Conv2D(16, 3, 1, 1, use_bias=False),
                          norm_layer(**(norm_kwargs or {})), gluon.nn.Activation("relu"))
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            self.features.add(BasicBlock(channels, stride, norm_layer, norm_kwargs))
        self.features.add(gluon.nn.GlobalAvgPool2D())
        self.output = gluon.nn.Dense(classes)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="examples per worker and step")
    args = ap.parse_args()

    hvd.init()
    ctx = mx.gpu(hvd.local_rank()) if mx.context.num_gpus() else mx.cpu()
    # GluonCV's --syncbn, across processes: the only change is the class.
    net = SmallResNet(norm_layer=distbn.SyncBatchNorm, norm_kwargs={"num_devices": 1})
    net.initialize(mx.init.Xavier(), ctx=ctx)
    images, labels = load_fashion_mnist(train=True)
    rs = np.random.RandomState(hvd.rank())

    def batch():
        i = rs.randint(0, len(images), args.batch)
        return (nd.array(images[i].astype(np.float32)[:, None] / 255.0, ctx=ctx),
                nd.array(labels[i], ctx=ctx))

    net(batch()[0])  # deferred shapes
    net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)
    trainer = hvd.DistributedTrainer(net.collect_params(), "sgd",
                                     {"learning_rate": 0.1, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(1, args.steps + 1):
        x, y = batch()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(args.batch)
        if step % 10 == 0 or step == args.steps:
            mean = hvd.allreduce(loss.mean(), name=f"loss.{step}").asscalar()
            if hvd.rank() == 0:
                print(f"step {step}: loss {mean:.4f}", flush=True)


if __name__ == "__main__":
    main()
