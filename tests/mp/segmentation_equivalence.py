"""Worker: a segmentation network written as GluonCV writes its FCN, built with
``norm_layer=distbn.SyncBatchNorm, norm_kwargs={"num_devices": D}``, on N workers x D devices
equals the same network with Gluon's BN in float64 on the whole batch, in one process.

    horovodrun -np 2 python tests/mp/segmentation_equivalence.py --devices 2 --sizes 3,1,2,2

The network: GluonCV's shape at a small scale, every norm layer from ``norm_layer(**norm_kwargs)``
with its channels left to the first input (GluonCV's ResNet-V1b blocks pass none): a stride-2
stem (conv, norm, relu), a dilated stage (conv with dilation 2, as GluonCV's segmentation
backbones keep output stride 8), an FCN head (conv 3x3, norm, relu, conv 1x1 to the classes;
GluonCV's has a dropout between, left out so that both sides compute the same thing), bilinear
upsampling to the input size (``contrib.BilinearResize2D``, as GluonCV), per-pixel softmax
cross-entropy summed over the batch. Each step: a forward per device (the book's loop), one
backward from the devices' losses; checked against the float64 truth: every device's output
and input gradient, every parameter's gradient summed over devices and workers, every device's
running statistics; then both take the same SGD step (the global gradient). ``--sizes``: one
batch size per worker and device, in rank-major order. ``--layer local``: Gluon's BN in each
device (each its own statistics), the negative control.
"""
import argparse
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import distbn
from distbn.comm import get_comm
from distbn.models import finish_shapes

CLASSES, C_IN, HW = 4, 3, 12
RTOL = 1e-4  # float32 against float64, relative to the largest reference value


class FCNHead(gluon.HybridBlock):
    def __init__(self, channels, norm_layer, norm_kwargs, **kwargs):
        super().__init__(**kwargs)
        self.block = gluon.nn.HybridSequential()
        self.block.add(gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False),
                       norm_layer(**norm_kwargs), gluon.nn.Activation("relu"),
                       gluon.nn.Conv2D(CLASSES, 1))

    def hybrid_forward(self, F, x):
        return self.block(x)


class FCN(gluon.HybridBlock):
    def __init__(self, norm_layer=gluon.nn.BatchNorm, norm_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        norm_kwargs = norm_kwargs or {}
        self.stem = gluon.nn.HybridSequential()
        self.stem.add(gluon.nn.Conv2D(8, 3, strides=2, padding=1, use_bias=False),
                      norm_layer(**norm_kwargs), gluon.nn.Activation("relu"))
        self.stage = gluon.nn.HybridSequential()
        self.stage.add(gluon.nn.Conv2D(16, 3, padding=2, dilation=2, use_bias=False),
                       norm_layer(**norm_kwargs), gluon.nn.Activation("relu"))
        self.head = FCNHead(8, norm_layer, norm_kwargs)

    def hybrid_forward(self, F, x):
        return F.contrib.BilinearResize2D(self.head(self.stage(self.stem(x))), height=HW, width=HW)


def global_batch(step, total):
    rs = np.random.RandomState(100 + step)
    return 1.0 + rs.randn(total, C_IN, HW, HW), rs.randint(0, CLASSES, (total, HW, HW))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--sizes", required=True, help="batch size per worker and device, rank-major")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--layer", choices=["sync", "local"], default="sync")
    ap.add_argument("--hybridize", action="store_true")
    args = ap.parse_args()
    comm = get_comm()
    sizes = [int(s) for s in args.sizes.split(",")]
    assert len(sizes) == comm.size * args.devices, "one size per worker and device"
    ctxs = [mx.cpu(d) for d in range(args.devices)]
    mine = range(comm.rank * args.devices, (comm.rank + 1) * args.devices)  # this worker's replicas
    starts = np.cumsum([0] + sizes)

    if args.layer == "sync":
        net = FCN(norm_layer=distbn.SyncBatchNorm, norm_kwargs={"num_devices": args.devices})
    else:
        net = FCN(norm_layer=gluon.nn.BatchNorm)
    mx.random.seed(0)  # the same initial values on every worker
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    ref = FCN()
    ref.initialize()
    ref.cast("float64")
    probe = mx.nd.zeros((1, C_IN, HW, HW))
    finish_shapes(net, probe.as_in_context(ctxs[0]))
    finish_shapes(ref, probe.astype("float64"))
    if args.hybridize:
        net.hybridize(static_alloc=True)
    ours, theirs = list(net.collect_params().values()), list(ref.collect_params().values())
    for p, q in zip(ours, theirs):  # by position: the same layers in the same order
        q.set_data(p.data().astype("float64"))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)

    worst = {}
    for step in range(args.steps):
        X, Y = global_batch(step, int(starts[-1]))
        xs = [mx.nd.array(X[starts[r]:starts[r + 1]], ctx=c) for r, c in zip(mine, ctxs)]
        ys = [mx.nd.array(Y[starts[r]:starts[r + 1]], ctx=c) for r, c in zip(mine, ctxs)]
        for x in xs:
            x.attach_grad()
        with autograd.record():
            outs = [net(x) for x in xs]
            losses = [loss_fn(o, y).sum() for o, y in zip(outs, ys)]
        for loss in losses:
            loss.backward()
        X64, Y64 = mx.nd.array(X, dtype="float64"), mx.nd.array(Y, dtype="float64")
        X64.attach_grad()
        with autograd.record():
            out64 = ref(X64)
            loss64 = loss_fn(out64, Y64).sum()
        loss64.backward()

        def err(name, got, want):
            scale = max(1.0, float(np.max(np.abs(want))))
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(got - want))) / scale)

        for r, o, x in zip(mine, outs, xs):
            err("output", o.asnumpy(), out64.asnumpy()[starts[r]:starts[r + 1]])
            err("input gradient", x.grad.asnumpy(), X64.grad.asnumpy()[starts[r]:starts[r + 1]])
        grads = []
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if p.grad_req == "null":  # running statistics: every device's copy
                for c in ctxs:
                    err("running statistics", p.data(c).asnumpy(), q.data().asnumpy())
                continue
            local = sum(g.asnumpy().astype(np.float64) for g in p.list_grad())  # over devices
            total = comm.allreduce_sum(mx.nd.array(local, dtype="float64"),
                                       name=f"grad.{step}.{i}").asnumpy()    # over workers
            err("parameter gradient", total, q.grad().asnumpy())
            grads.append((p, q, total))
        for p, q, total in grads:  # the same SGD step on both sides, from the global gradient
            q.set_data(q.data() - args.lr * mx.nd.array(total, dtype="float64"))
            p.set_data(mx.nd.array(q.data().asnumpy(), dtype="float32"))

    bad = sorted(k for k, v in worst.items() if v > RTOL)
    figures = ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items()))
    print(f"rank {comm.rank}/{comm.size} devices={args.devices} layer={args.layer} "
          f"hybridized={args.hybridize} sizes={args.sizes}: {figures}: "
          + (f"MISMATCH {', '.join(bad)}" if bad else "OK"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
