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
  7. batches from distbn.data.ShardSampler: every worker the same number per epoch (Gluon's
     Dataset.shard gives some workers one example more, and then a step more: a hang)
  8. before evaluating, distbn.update_bn_stats: BN statistics of the weights as they are,
     over every worker's batches (the running averages lag the weights)
"""
import argparse

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon.model_zoo import vision

import distbn
from distbn.data import ShardSampler, load_fashion_mnist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", help="pretrained .params file of resnet18_v1(classes=10) "
                                      "(saved with Gluon's BN)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="examples per worker and step")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=6400, help="training examples used")
    args = ap.parse_args()

    hvd.init()                                                                        # 1
    ctx = mx.gpu(hvd.local_rank()) if mx.context.num_gpus() else mx.cpu()
    net = vision.resnet18_v1(classes=10)                                              # 2
    distbn.convert_sync_batchnorm(net)
    net.initialize(mx.init.Xavier(), ctx=ctx)                                         # 3
    if args.weights:
        net.load_parameters(args.weights, ctx=ctx)

    def dataset(train, limit):
        images, labels = load_fashion_mnist(train=train)
        x = images[:limit].astype(np.float32)[:, None] / 255.0
        return gluon.data.ArrayDataset(nd.array(x), nd.array(labels[:limit]))
    train_set = dataset(True, args.limit)
    sampler = ShardSampler(len(train_set), hvd.size(), hvd.rank(), seed=0)            # 7
    loader = gluon.data.DataLoader(train_set, batch_size=args.batch, sampler=sampler)

    net(train_set[:2][0].as_in_context(ctx))                                          # 4
    net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)                                                  # 5
    trainer = hvd.DistributedTrainer(net.collect_params(), "sgd",                     # 6
                                     {"learning_rate": args.lr, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # a new permutation, the same on every worker
        for x, y in loader:
            x, y = x.as_in_context(ctx), y.as_in_context(ctx)
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(x.shape[0])  # the trainer averages over workers: / batch per worker
            step += 1
            if step % 10 == 0 or step == args.steps:
                mean = hvd.allreduce(loss.mean(), name=f"loss.{step}").asscalar()  # over workers
                if hvd.rank() == 0:
                    print(f"step {step}: loss {mean:.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    distbn.update_bn_stats(net, ((x.as_in_context(ctx),) for x, _ in loader),       # 8
                           num_batches=20)
    test = dataset(False, 1000)
    mine = ShardSampler(len(test), hvd.size(), hvd.rank(), shuffle=False, last="drop")
    correct = sum(float((net(x.as_in_context(ctx)).argmax(axis=1) == y.as_in_context(ctx))
                        .sum().asscalar())
                  for x, y in gluon.data.DataLoader(test, batch_size=250, sampler=mine))
    counts = hvd.allreduce(nd.array([correct, len(mine)]), name="test.accuracy",
                           op=hvd.Sum).asnumpy()
    if hvd.rank() == 0:
        print(f"test accuracy {counts[0] / counts[1]:.3f} on {int(counts[1])} examples", flush=True)


if __name__ == "__main__":
    main()
