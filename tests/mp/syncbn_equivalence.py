"""Worker: SyncBatchNorm on N workers == gluon.nn.BatchNorm on the concatenated batch.

Run under horovodrun; every rank builds the same global batch from a fixed seed, takes its
slice, and checks outputs, input gradients, summed gamma/beta gradients and moving statistics
against a one-process reference over several SGD steps. Exits non-zero on any mismatch.
``--axis -1``: channels last, (N, W, C) or (N, H, W, C), after a dense layer acting on the
last axis; ``--numpy``: the whole run in MXNet's numpy mode (``npx.set_np()``, mx.np arrays).
A size of 0 (numpy mode) gives that worker an empty batch; the network is then the BN layer
alone (MXNet's Dense and Conv2D take no empty batch). Every worker empty: the rules alone
(empty outputs, zero gradients, running statistics unchanged, both exchanges still run), as
Gluon's BN would fill its statistics with NaN.

    horovodrun -np 4 python tests/mp/syncbn_equivalence.py --ndim 4 --sizes 3,5,1,7
"""
import argparse
import sys

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

import distbn
from distbn.comm import get_comm

# Allowed error relative to the largest reference value, by the data's type: float16 data
# round to ~5e-4 at each of the networks' layers; float64 runs show the arithmetic alone.
RTOL = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-2}


def build(bn_factory, ndim, channels, seed, hybridize=False, bn_only=False, axis=1):
    net = gluon.nn.HybridSequential()
    if bn_only:  # MXNet's CPU convolutions and dense layers take neither float16 nor float64
        net.add(bn_factory())
    elif axis != 1:  # channels last: a dense layer on the last axis (MXNet's CPU convolutions
        # take NCHW only)
        net.add(gluon.nn.Dense(channels, flatten=False), bn_factory(),
                gluon.nn.Activation("sigmoid"), gluon.nn.Dense(5))
    else:
        # A learnable layer before BN so input gradients flow into trained weights; one after
        # so the loss mixes channels.
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


def close(name, got, want, step, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() if got.size else 0.0
    scale = max(np.abs(want).max(), 1e-3) if want.size else 1.0
    if not got.shape == want.shape or err > rtol * scale:
        print(f"MISMATCH step {step} {name}: max abs err {err:.3g}, scale {scale:.3g}", flush=True)
        return False
    return True


def _say(what):
    print(f"MISMATCH: {what}", flush=True)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ndim", type=int, default=4)
    ap.add_argument("--sizes", default="", help="per-rank batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mean", type=float, default=0.5)
    ap.add_argument("--hybridize", action="store_true", help="compile the network, BN included")
    ap.add_argument("--dtype", choices=list(RTOL), default="float32",
                    help="the networks cast to it (BN parameters stay float32 for float16); "
                         "other than float32, the networks are the BN layer alone")
    ap.add_argument("--layer", choices=["sync", "local"], default="sync",
                    help="local: distbn.BatchNorm, a negative control that must FAIL at size > 1")
    ap.add_argument("--axis", type=int, choices=[1, -1], default=1)
    ap.add_argument("--numpy", action="store_true", help="MXNet's numpy mode, mx.np arrays")
    args = ap.parse_args()
    if args.numpy:
        mx.npx.set_np()
    array = mx.np.array if args.numpy else nd.array
    comm = get_comm()
    rank, size = comm.rank, comm.size
    sizes = [int(s) for s in args.sizes.split(",")][:size] if args.sizes else [4] * size
    assert len(sizes) == size, f"need {size} sizes, got {sizes}"
    assert args.numpy or 0 not in sizes, "legacy NDArrays cannot hold an empty batch: --numpy"
    bn_only = args.dtype != "float32" or 0 in sizes
    channels = 6
    in_ch = channels if bn_only else 3
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])

    bn_dims = args.ndim if args.axis == 1 else None  # the book's num_dims: NC and NCHW
    ref = build(lambda: gluon.nn.BatchNorm(in_channels=channels, axis=args.axis), args.ndim,
                channels, seed=1, bn_only=bn_only, axis=args.axis)
    layer = distbn.SyncBatchNorm if args.layer == "sync" else distbn.BatchNorm
    # With empty batches the layer is hybridized on its own: a compiled graph around it would
    # hold MXNet's own operators, which take no empty batch.
    net = build(lambda: layer(channels, bn_dims, axis=args.axis), args.ndim, channels, seed=2,
                hybridize=args.hybridize and 0 not in sizes, bn_only=bn_only, axis=args.axis)
    if args.hybridize and 0 in sizes:
        net[0].hybridize(static_alloc=True)
    if args.axis == -1:
        shape_in = (total,) + (6,) * (args.ndim - 2) + (in_ch,)
    elif args.ndim == 4:
        shape_in = (total, in_ch, 6, 6)
    else:
        shape_in = (total, in_ch if bn_only else 10)
    out_shape = shape_in if bn_only else (total, 5)
    rs = np.random.RandomState(123)
    x0 = rs.rand(max(total, 2), *shape_in[1:]).astype(np.float32)
    ref(array(x0[:2]))  # finish deferred init, then make the two networks identical
    net(array(x0[:2]))
    copy_params(ref, net)
    if args.dtype != "float32":
        ref.cast(args.dtype)
        net.cast(args.dtype)
    dtype, rtol = args.dtype, RTOL[args.dtype]
    # Equal initial values are the premise: check them once.
    ok = all(close("init " + q.name, q.data().asnumpy().ravel(), p.data().asnumpy().ravel(), 0, rtol)
             for p, q in zip(ref.collect_params().values(), net.collect_params().values()))

    lr = 0.5
    ref_tr = gluon.Trainer(ref.collect_params(), "sgd", {"learning_rate": lr})
    net_tr = comm.trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    bn_ref, bn_net = (ref[0], net[0]) if bn_only else (ref[1], net[1])
    for step in range(1, args.steps + 1):
        xg = (args.mean + rs.randn(*shape_in)).astype(dtype)
        w = rs.randn(*out_shape).astype(dtype)  # per-output loss weights
        xr, xs = array(xg, dtype=dtype), array(xg[lo:hi], dtype=dtype)
        xr.attach_grad(); xs.attach_grad()
        before = comm.collectives
        with autograd.record():
            yr = ref(xr); lr_ = (yr * array(w, dtype=dtype)).sum()
            ys = net(xs); ls_ = (ys * array(w[lo:hi], dtype=dtype)).sum()
        lr_.backward(); ls_.backward()
        nd.waitall()
        per_step = comm.collectives - before
        want_coll = 2 if size > 1 and args.layer == "sync" else 0
        if per_step != want_coll:
            print(f"MISMATCH step {step}: {per_step} collectives, expected {want_coll}", flush=True)
            ok = False
        ok &= ys.dtype == xs.dtype and xs.grad.dtype == xs.dtype or _say(f"dtypes {ys.dtype}, {xs.grad.dtype}")
        if total == 0:  # the reference would be Gluon's NaN: PyTorch's rules instead
            ref_y, ref_dx = np.zeros(shape_in), np.zeros(shape_in)
            ref_grads = {p: np.zeros(channels) for p in ("gamma", "beta")}
            ref_stats = {"running_mean": np.zeros(channels), "running_var": np.ones(channels)}
        else:
            ref_y, ref_dx = yr.asnumpy(), xr.grad.asnumpy()
            ref_grads = {p: getattr(bn_ref, p).grad().asnumpy() for p in ("gamma", "beta")}
            ref_stats = {p: getattr(bn_ref, p).data().asnumpy() for p in ("running_mean", "running_var")}
        ok &= close("output", ys.asnumpy(), ref_y[lo:hi], step, rtol)
        ok &= close("input grad", xs.grad.asnumpy(), ref_dx[lo:hi], step, rtol)
        for pname in ("gamma", "beta"):
            g = getattr(bn_net, pname).grad().copy().reshape(-1)
            g = g.as_nd_ndarray() if args.numpy else g  # Horovod's collectives take NDArrays
            gsum = comm.allreduce_sum(g, name=f"test.{pname}.{step}").asnumpy()
            ok &= close(f"{pname} grad (summed)", gsum, ref_grads[pname], step, rtol)
        for pname in ("running_mean", "running_var"):
            ok &= close(pname, getattr(bn_net, pname).data().asnumpy().ravel(), ref_stats[pname],
                        step, rtol)
        ref_tr.step(max(total, 1))
        net_tr.step(max(total, 1) / size)  # DistributedTrainer averages over workers: sum/total
    # Prediction mode never communicates and uses the (identical) moving statistics.
    before = comm.collectives
    xg = (args.mean + rs.randn(*shape_in)).astype(dtype)
    want = ref(array(xg, dtype=dtype)).asnumpy()[lo:hi] if total else np.zeros(shape_in)
    ok &= close("prediction output", net(array(xg[lo:hi], dtype=dtype)).asnumpy(), want,
                "predict", rtol)
    if comm.collectives != before:
        print("MISMATCH: prediction mode issued a collective", flush=True)
        ok = False
    via = "gloo" if comm.engine else "none"
    mode = f" axis={args.axis}" * (args.axis != 1) + " numpy" * args.numpy
    print(f"rank {rank}/{size} sizes={sizes} ndim={args.ndim}{mode} dtype={dtype} via={via} "
          f"hybridized={args.hybridize}: "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
