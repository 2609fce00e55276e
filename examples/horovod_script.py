"""Your own Horovod training script with synced batch norm: a model-zoo ResNet-18 whose BN
layers become distbn.SyncBatchNorm, pretrained Gluon weights from a local file, Fashion-MNIST.

    horovodrun -np 4 python examples/horovod_script.py --weights resnet18_v1.params
    python examples/horovod_script.py --steps 20          # one process: Gluon's BN math

The order of the steps that works (each one says why):
  1. hvd.init()                          before anything asks for rank or size
  2. build the network, convert_sync_batchnorm(net)
  3. net.initialize(), then load_parameters(pretrained file): a file saved from the network
     with gluon.nn.BatchNorm loads as it is (same parameter names)
  4. one forward pass on a batch (shapes the model zoo defers), then net.hybridize()
  5. distbn.broadcast_parameters(net): every worker starts from rank 0's values (works in
     whatever memory layout the pass left the weights)
  6. hvd.DistributedTrainer: gradients averaged over workers
"""
import argparse

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon.model_zoo import vision

import distbn
from distbn.data import load_fashion_mnist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", help="pretrained .params file of resnet18_v1(classes=10) "
                                      "(saved with Gluon's BN)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="examples per worker and step")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    hvd.init()                                                                        # 1
    ctx = mx.gpu(hvd.local_rank()) if mx.context.num_gpus() else mx.cpu()
    net = vision.resnet18_v1(classes=10)                                              # 2
    distbn.convert_sync_batchnorm(net)
    net.initialize(mx.init.Xavier(), ctx=ctx)                                         # 3
    if args.weights:
        net.load_parameters(args.weights, ctx=ctx)

    images, labels = load_fashion_mnist(train=True)
    rs = np.random.RandomState(hvd.rank())  # each worker draws its own batches
    def batch():
        i = rs.randint(0, len(images), args.batch)
        x = images[i].astype(np.float32)[:, None] / 255.0
        return nd.array(x, ctx=ctx), nd.array(labels[i], ctx=ctx)

    net(batch()[0])                                                                   # 4
    net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)                                                  # 5
    trainer = hvd.DistributedTrainer(net.collect_params(), "sgd",                     # 6
                                     {"learning_rate": args.lr, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(1, args.steps + 1):
        x, y = batch()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(args.batch)  # the trainer averages over workers: / batch per worker
        if step % 10 == 0 or step == args.steps:
            mean = hvd.allreduce(loss.mean(), name=f"loss.{step}").asscalar()  # over workers
            if hvd.rank() == 0:
                print(f"step {step}: loss {mean:.4f}", flush=True)


if __name__ == "__main__":
    main()
