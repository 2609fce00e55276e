"""distbn.freeze_batchnorm on every worker (``horovodrun -np N`` or plain python).

A network of synced layers (``--layer sync``) or Gluon's (``--layer gluon``), frozen, trains
one step: each example's training-mode output is the same alone as within the worker's batch
(the statistics come from nowhere but the running ones), the running statistics keep their
values, the step issues no collective on the sync layers' engine, and with ``--affine``
gamma and beta keep theirs too. Unfrozen again, the same checks must fail (the negative
control, run by ``--control unfrozen``: the layer syncs and depends on the batch again).
"""
import argparse
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import distbn
from distbn import engine
from distbn.comm import get_comm


def build(kind):
    bn = distbn.SyncBatchNorm if kind == "sync" else (lambda c, d: gluon.nn.BatchNorm(in_channels=c))
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2), bn(4, 4), gluon.nn.Activation("relu"),
            gluon.nn.Dense(3, in_units=4 * 6 * 6))
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", choices=["sync", "gluon"], default="sync")
    ap.add_argument("--hybridize", action="store_true")
    ap.add_argument("--affine", action="store_true")
    ap.add_argument("--control", choices=["none", "unfrozen"], default="none")
    args = ap.parse_args()
    comm = get_comm()
    mx.random.seed(0)
    net = build(args.layer)
    net.initialize(mx.init.Xavier())
    if args.hybridize:
        net.hybridize(static_alloc=True)
    bn = distbn.convert.bn_layers(net)[0]
    bn.running_mean.set_data(mx.nd.array([0.5, -1, 2, 0]))  # values a fine-tuning run keeps
    bn.running_var.set_data(mx.nd.array([2.0, 0.5, 1, 3]))
    distbn.broadcast_parameters(net)
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    distbn.freeze_batchnorm(net, affine=args.affine)
    if args.control == "unfrozen":
        distbn.unfreeze_batchnorm(net)
    rs = np.random.RandomState(comm.rank)
    x = mx.nd.array(3 + 2 * rs.randn(5, 2, 8, 8))
    kept = [p.data().asnumpy().copy() for p in (bn.running_mean, bn.running_var, bn.gamma, bn.beta)]
    with autograd.record():  # training mode, one example alone (before the step moves weights)
        alone = net(x[:1]).asnumpy()
    engine_before = engine.count() if comm.engine else 0
    with autograd.record():
        y = net(x)
        loss = y.square().sum()
    loss.backward()
    trainer.step(1)
    mx.nd.waitall()
    engine_calls = (engine.count() if comm.engine else 0) - engine_before
    batch_dep = float(np.max(np.abs(alone - y[:1].asnumpy())))
    now = [p.data().asnumpy() for p in (bn.running_mean, bn.running_var, bn.gamma, bn.beta)]
    stats_moved = max(float(np.max(np.abs(a - b))) for a, b in zip(now[:2], kept[:2]))
    affine_moved = max(float(np.max(np.abs(a - b))) for a, b in zip(now[2:], kept[2:]))
    problems = []
    if batch_dep > 1e-5:
        problems.append(f"output depends on the batch ({batch_dep:.1e})")
    if stats_moved > 0:
        problems.append(f"running statistics moved ({stats_moved:.1e})")
    if engine_calls:
        problems.append(f"{engine_calls} engine collectives")
    if args.affine and affine_moved > 0:
        problems.append(f"gamma/beta moved ({affine_moved:.1e})")
    if not args.affine and affine_moved == 0:
        problems.append("gamma/beta did not learn")
    print(f"rank {comm.rank}/{comm.size} layer={args.layer} hybridized={args.hybridize} "
          f"affine={args.affine} control={args.control}: "
          + (f"MISMATCH {'; '.join(problems)}" if problems else "OK"), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
