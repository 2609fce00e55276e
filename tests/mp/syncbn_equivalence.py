"""Worker: SyncBatchNorm on N workers == gluon.nn.BatchNorm on the concatenated batch.

Run under horovodrun; every rank builds the same global batch from a fixed seed, takes its
slice, and checks outputs, input gradients, summed gamma/beta gradients and moving statistics
against a one-process reference over several SGD steps. Exits non-zero on any mismatch.

    horovodrun -np 4 python tests/mp/syncbn_equivalence.py --ndim 4 --sizes 3,5,1,7
"""
import argparse
import sys

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

import distbn
from distbn.comm import get_comm

RTOL = 1e-5


def build(bn_factory, ndim, channels, seed, hybridize=False):
    net = gluon.nn.HybridSequential()
    # A learnable layer before BN so input gradients flow into trained weights; one after so
    # the loss mixes channels.
    net.add(gluon.nn.Conv2D(channels, 3, padding=1) if ndim == 4 else gluon.nn.Dense(channels),
            bn_factory(), gluon.nn.Activation("sigmoid"), gluon.nn.Dense(5))
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize(static_alloc=True)
    return net


def copy_params(src, dst):
    """Copy values by position (names differ between the two networks)."""
    s = list(src.collect_params().values())
    d = list(dst.collect_params().values())
    for p, q in zip(s, d):
        if q._data is None:
            continue
        q.set_data(p.data().reshape(q.shape))


def close(name, got, want, step):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() if got.size else 0.0
    scale = max(np.abs(want).max(), 1e-3) if want.size else 1.0
    if not got.shape == want.shape or err > RTOL * scale:
        print(f"MISMATCH step {step} {name}: max abs err {err:.3g}, scale {scale:.3g}", flush=True)
        return False
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ndim", type=int, default=4)
    ap.add_argument("--sizes", default="", help="per-rank batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mean", type=float, default=0.5)
    ap.add_argument("--hybridize", action="store_true", help="compile the network, BN included")
    ap.add_argument("--layer", choices=["sync", "local"], default="sync",
                    help="local: distbn.BatchNorm, a negative control that must FAIL at size > 1")
    args = ap.parse_args()
    comm = get_comm()
    rank, size = comm.rank, comm.size
    sizes = [int(s) for s in args.sizes.split(",")][:size] if args.sizes else [4] * size
    assert len(sizes) == size, f"need {size} sizes, got {sizes}"
    channels, in_ch = 6, 3
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])

    bn_dims = args.ndim
    ref = build(lambda: gluon.nn.BatchNorm(in_channels=channels), args.ndim, channels, seed=1)
    layer = distbn.SyncBatchNorm if args.layer == "sync" else distbn.BatchNorm
    net = build(lambda: layer(channels, bn_dims), args.ndim, channels, seed=2, hybridize=args.hybridize)
    shape_in = (total, in_ch, 6, 6) if args.ndim == 4 else (total, 10)
    rs = np.random.RandomState(123)
    x0 = rs.rand(*shape_in).astype(np.float32)
    ref(nd.array(x0[:2]))  # finish deferred init, then make the two networks identical
    net(nd.array(x0[:2]))
    copy_params(ref, net)
    # Equal initial values are the premise: check them once.
    ok = all(close("init " + q.name, q.data().asnumpy().ravel(), p.data().asnumpy().ravel(), 0)
             for p, q in zip(ref.collect_params().values(), net.collect_params().values()))

    lr = 0.5
    ref_tr = gluon.Trainer(ref.collect_params(), "sgd", {"learning_rate": lr})
    net_tr = comm.trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    bn_ref, bn_net = ref[1], net[1]
    for step in range(1, args.steps + 1):
        xg = (args.mean + rs.randn(*shape_in)).astype(np.float32)
        w = rs.randn(total, 5).astype(np.float32)  # per-example loss weights
        xr, xs = nd.array(xg), nd.array(xg[lo:hi])
        xr.attach_grad(); xs.attach_grad()
        before = comm.collectives
        with autograd.record():
            yr = ref(xr); lr_ = (yr * nd.array(w)).sum()
            ys = net(xs); ls_ = (ys * nd.array(w[lo:hi])).sum()
        lr_.backward(); ls_.backward()
        nd.waitall()
        per_step = comm.collectives - before
        want_coll = 2 if size > 1 and args.layer == "sync" else 0
        if per_step != want_coll:
            print(f"MISMATCH step {step}: {per_step} collectives, expected {want_coll}", flush=True)
            ok = False
        ok &= close("output", ys.asnumpy(), yr.asnumpy()[lo:hi], step)
        ok &= close("input grad", xs.grad.asnumpy(), xr.grad.asnumpy()[lo:hi], step)
        for pname in ("gamma", "beta"):
            g = getattr(bn_net, pname).grad().copy().reshape(-1)
            gsum = comm.allreduce_sum(g, name=f"test.{pname}.{step}").asnumpy()
            ok &= close(f"{pname} grad (summed)", gsum, getattr(bn_ref, pname).grad().asnumpy(), step)
        ok &= close("running_mean", bn_net.running_mean.data().asnumpy().ravel(),
                    bn_ref.running_mean.data().asnumpy(), step)
        ok &= close("running_var", bn_net.running_var.data().asnumpy().ravel(),
                    bn_ref.running_var.data().asnumpy(), step)
        ref_tr.step(total)
        net_tr.step(total / size)  # DistributedTrainer averages over workers; this makes sum/total
    # Prediction mode never communicates and uses the (identical) moving statistics.
    before = comm.collectives
    xg = (args.mean + rs.randn(*shape_in)).astype(np.float32)
    ok &= close("prediction output", net(nd.array(xg[lo:hi])).asnumpy(),
                ref(nd.array(xg)).asnumpy()[lo:hi], "predict")
    if comm.collectives != before:
        print("MISMATCH: prediction mode issued a collective", flush=True)
        ok = False
    via = "gloo" if comm.engine else "none"
    print(f"rank {rank}/{size} sizes={sizes} ndim={args.ndim} via={via} hybridized={args.hybridize}: "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
