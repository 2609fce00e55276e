"""distbn.update_bn_stats against a float64 computation of its definition (docs/layer.md),
run on every worker (``horovodrun -np N`` or plain python).

The network: conv(4, 3x3) BN relu dense(6) BN dense(3) on (n, 2, 8, 8) data of mean 2, with
BN layers of the kind ``--layer`` names: ``sync`` (SyncBatchNorm over all workers), ``group``
(SyncBatchNorm over pairs of ranks), ``local`` (distbn.BatchNorm), ``gluon``
(gluon.nn.BatchNorm). Every worker trains two steps (so the moving averages and gradients are
not their initial values), then re-estimates with its own batches: batch b of rank r holds
2 + (3r + b) % 5 examples, so batch sizes differ between workers and batches. ``--extra-rank``
gives rank r r more batches than rank 0: all must stop at rank 0's count, whether the
batches come as a generator (agreed batch by batch) or as a list (``--as-list``: counted).
``--devices D``: each worker drives mx.cpu(0..D-1); device d of rank r is replica rD + d, whose
batch b is the one rank rD + d holds at one device a worker (the truth groups replicas: all of
them for sync, each alone for local and gluon).

The truth, in one process on every worker: the same network in float64 with Gluon's BN,
given the learned values; for every batch index and every group of workers whose batches a
layer of kind ``--expect`` (default: ``--layer``) normalizes together, the union of their
batches goes through it in training mode and each BN layer's input gives count, mean and
biased variance in float64; running_mean = sum n m / sum n, running_var = sum n v / sum n.
Checked: the running statistics within 1e-5 of the truth's scale, identical on every worker,
every other parameter and every gradient bit-identical to before, the network's prediction
(hybridized: its compiled graph) that of the truth's network with these statistics. Negative controls: a kind
checked against another kind's truth (``--layer local --expect sync``), and ``--control ema``
(no re-estimation: the moving averages, which evaluation uses without it), both MISMATCH.
"""
import argparse
import hashlib
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import distbn
from distbn.comm import get_comm

C_IN, HW = 2, 8
ARRAY = [mx.nd.array]  # mx.np.array in numpy mode (--numpy)


def batch(replica, b):
    rs = np.random.RandomState(1000 * replica + b)
    return 2 + 1.5 * rs.randn(2 + (3 * replica + b) % 5, C_IN, HW, HW)


def build(kind, comm, dtype="float32"):
    def bn(channels, ndim):
        if kind == "sync":
            return distbn.SyncBatchNorm(channels, ndim)
        if kind == "group":
            first = comm.rank - comm.rank % 2
            return distbn.SyncBatchNorm(channels, ndim, process_set=comm.group([first, first + 1]))
        if kind == "local":
            return distbn.BatchNorm(channels, ndim)
        return gluon.nn.BatchNorm(in_channels=channels)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=C_IN), bn(4, 4), gluon.nn.Activation("relu"),
            gluon.nn.Dense(6, in_units=4 * 6 * 6), bn(6, 2), gluon.nn.Dense(3, in_units=6))
    return net


def groups(kind, size, devices):
    """The replicas (rank * devices + device) whose batches a layer of ``kind`` normalizes together."""
    if kind == "sync":
        return [tuple(range(size * devices))]
    if kind == "group":
        return [tuple(range(r * devices, (r + 2) * devices)) for r in range(0, size, 2)]
    return [(i,) for i in range(size * devices)]


def truth(net, kind, size, batches, devices=1):
    """(means, vars) per BN layer of the definition, float64, over ``batches`` per replica."""
    ref = build("gluon", None)
    ref.initialize()
    ref.cast("float64")
    for p, q in zip(net.collect_params().values(), ref.collect_params().values()):  # same order
        q.set_data(p.data().astype("float64"))
    layers = distbn.convert.bn_layers(ref)
    sums = [[0.0, 0.0, 0.0] for _ in layers]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda blk, inp: seen.append(inp[0].asnumpy()))
             for layer in layers]
    for b in range(batches):
        for members in groups(kind, size, devices):
            seen.clear()
            x = np.concatenate([batch(r, b) for r in members])
            with autograd.train_mode():
                ref(ARRAY[0](x, dtype="float64"))
            for acc, inp in zip(sums, seen):
                z = np.moveaxis(inp, 1, 0).reshape(inp.shape[1], -1)  # (C, n * rest)
                n = z.shape[1]
                acc[0] += n
                acc[1] = acc[1] + n * z.mean(axis=1)
                acc[2] = acc[2] + n * z.var(axis=1)
    for h in hooks:
        h.detach()
    return [(s1 / s0, s2 / s0) for s0, s1, s2 in sums]


def parts(replicas, ctxs, b):
    """Batch ``b`` of this worker: one float32 array per device (replica)."""
    return [ARRAY[0](batch(r, b), dtype="float32", ctx=c) for r, c in zip(replicas, ctxs)]


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a.asnumpy()).tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", choices=["sync", "group", "local", "gluon"], default="sync")
    ap.add_argument("--expect", choices=["sync", "group", "local", "gluon"])
    ap.add_argument("--hybridize", action="store_true")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--extra-rank", action="store_true")
    ap.add_argument("--as-list", action="store_true", help="batches as a list (else a generator)")
    ap.add_argument("--control", choices=["none", "ema"], default="none")
    ap.add_argument("--numpy", action="store_true", help="MXNet's numpy mode, mx.np arrays")
    ap.add_argument("--devices", type=int, default=1, help="CPU devices per worker")
    args = ap.parse_args()
    if args.numpy:
        mx.npx.set_np()
        ARRAY[0] = mx.np.array
    expect = args.expect or args.layer
    comm = get_comm()
    mx.random.seed(0)
    ctxs = [mx.cpu(d) for d in range(args.devices)]
    replicas = [comm.rank * args.devices + d for d in range(args.devices)]
    net = build(args.layer, comm)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    if args.hybridize:
        net.hybridize(static_alloc=True)
    distbn.broadcast_parameters(net)
    trainer = comm.trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    for b in (100, 101):
        with autograd.record():
            losses = [(y * y).sum() for y in (net(part) for part in parts(replicas, ctxs, b))]
        autograd.backward(losses)
        trainer.step(1)  # the same scale on every worker (their batch sizes differ)
    learned = [p for p in net.collect_params().values() if p.grad_req != "null"]
    before = digest([p.data() for p in learned] + [p.grad() for p in learned])

    bn = distbn.convert.bn_layers(net)
    mine = args.batches + (comm.rank if args.extra_rank else 0)
    used = args.batches
    if args.control == "none":
        # One device: (x,) per batch; several: one (x,) per device, as split_and_load's list.
        batches = ([(x,) for x in parts(replicas, ctxs, b)] if args.devices > 1
                   else (parts(replicas, ctxs, b)[0],) for b in range(mine))
        used = distbn.update_bn_stats(net, list(batches) if args.as_list else batches)
    else:
        for b in range(args.batches):  # what the moving averages make of the same batches
            with autograd.record():
                ys = [net(part) for part in parts(replicas, ctxs, b)]
            autograd.backward(ys)
    after = digest([p.data() for p in learned] + [p.grad() for p in learned])
    stats = [(layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy())
             for layer in bn]
    copies = {digest([p.data(c) for layer in bn for p in (layer.running_mean, layer.running_var)])
              for c in ctxs}
    want = truth(net, expect, comm.size, used, args.devices)
    # The network (hybridized: its compiled graph) now predicts with these statistics.
    ref = build("gluon", None)
    ref.initialize()
    ref.cast("float64")
    for p, q in zip(net.collect_params().values(), ref.collect_params().values()):
        q.set_data(p.data().astype("float64"))
    x = batch(0, 200)
    pred_err = float(np.max(np.abs(net(ARRAY[0](x, dtype="float32")).asnumpy() -
                                   ref(ARRAY[0](x, dtype="float64")).asnumpy())))
    err = max(float(np.max(np.abs(got - ref)) / (1 + np.max(np.abs(ref))))
              for pair_got, pair_ref in zip(stats, want) for got, ref in zip(pair_got, pair_ref))
    same = (len(set(comm.allgather_object(digest([mx.nd.array(a) for s in stats for a in s])))) == 1
            and len(copies) == 1)  # every worker, and every device of this one
    tag = (f"rank {comm.rank}/{comm.size} devices={args.devices} layer={args.layer}{' numpy' * args.numpy} expect={expect} control={args.control}"
           f" hybridized={args.hybridize} used={used} err={err:.2e} identical={same}"
           f" prediction_err={pred_err:.1e}")
    problems = []
    if err > 1e-5:
        problems.append("statistics")
    if not same:
        problems.append("workers or devices differ")
    if pred_err > 1e-4:
        problems.append("prediction")
    if args.control == "none" and before != after:
        problems.append("parameters or gradients changed")
    if used != args.batches:
        problems.append(f"used {used} batches")
    print(f"{tag}: " + (f"MISMATCH {', '.join(problems)}" if problems else "OK"), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
