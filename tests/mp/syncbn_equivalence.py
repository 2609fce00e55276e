"""Worker: SyncBatchNorm on N workers == gluon.nn.BatchNorm on the concatenated batch.

Run under horovodrun; every rank builds the same global batch from a fixed seed, takes its
slice, and checks outputs, input gradients, summed gamma/beta gradients and moving statistics
against a one-process reference over several SGD steps. Exits non-zero on any mismatch.
``--axis -1``: channels last, (N, W, C) or (N, H, W, C), after a dense layer acting on the
last axis; ``--numpy``: the whole run in MXNet's numpy mode (``npx.set_np()``, mx.np arrays).
A size of 0 (numpy mode) gives that worker an empty batch; the network is then the BN layer
alone (MXNet's Dense and Conv2D take no empty batch). Every worker empty: the rules alone
(empty outputs, zero gradients, running statistics unchanged, both exchanges still run), as
Gluon's BN would fill its statistics with NaN. ``--devices D``: each worker's network lives on
D CPU devices (``mx.cpu(0)`` ...), ``--sizes`` then gives a size per worker and device, and each
step runs the book's multi-device loop (``--loop book``: a forward per device, then
``for l in losses: l.backward()``) or GluonCV's (``--loop threads``: each device's forward in a
thread of its own, then one ``autograd.backward``); one process is a run of its own.

    horovodrun -np 4 python tests/mp/syncbn_equivalence.py --ndim 4 --sizes 3,5,1,7
    python tests/mp/syncbn_equivalence.py --devices 2 --sizes 1,5 --hybridize
"""
import argparse
import sys
import threading

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd

import distbn
from distbn.comm import get_comm

# Allowed error relative to the largest reference value, by the data's type: float16 data
# round to ~5e-4 at each of the networks' layers; float64 runs show the arithmetic alone.
RTOL = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-2}


def build(bn_factory, ndim, channels, seed, hybridize=False, bn_only=False, axis=1, ctx=None):
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
    net.initialize(mx.init.Xavier(), ctx=ctx)
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


def run_devices(net, xs, ws, loop):
    """Forward and backward of one step on every device, as the book's multi-GPU code does
    (``loop="book"``) or GluonCV's DataParallelModel (``"threads"``); the outputs."""
    ys, losses = [None] * len(xs), [None] * len(xs)

    def one(d):
        with autograd.record():
            ys[d] = net(xs[d])
            losses[d] = (ys[d] * ws[d]).sum()
    if loop == "book":
        for d in range(len(xs)):
            one(d)
        for loss in losses:
            loss.backward()
    else:
        threads = [threading.Thread(target=one, args=(d,)) for d in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        autograd.backward(losses)
    return ys


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
    ap.add_argument("--layer", choices=["sync", "local", "contrib"], default="sync",
                    help="local: distbn.BatchNorm, a negative control that must FAIL at size > 1; "
                         "contrib: MXNet's contrib SyncBatchNorm (one process, several devices)")
    ap.add_argument("--devices", type=int, default=1, help="CPU devices per worker")
    ap.add_argument("--loop", choices=["book", "threads"], default="book")
    ap.add_argument("--trainer", choices=["distbn", "horovod"], default="distbn",
                    help="horovod: horovod.mxnet's DistributedTrainer as it is, a negative control "
                         "(it all-reduces only the first device's gradients)")
    ap.add_argument("--axis", type=int, choices=[1, -1], default=1)
    ap.add_argument("--numpy", action="store_true", help="MXNet's numpy mode, mx.np arrays")
    args = ap.parse_args()
    if args.numpy:
        mx.npx.set_np()
    array = mx.np.array if args.numpy else nd.array
    comm = get_comm()
    rank, size = comm.rank, comm.size
    devices = [mx.cpu(i) for i in range(args.devices)]
    per_device = [int(s) for s in args.sizes.split(",")] if args.sizes else [4] * size * len(devices)
    per_device = per_device[:size * len(devices)]
    assert len(per_device) == size * len(devices), f"need {size} x {len(devices)} sizes"
    sizes = [sum(per_device[r * len(devices):(r + 1) * len(devices)]) for r in range(size)]
    mine = per_device[rank * len(devices):(rank + 1) * len(devices)]  # this worker's devices'
    cuts = np.cumsum([0] + mine)
    assert args.numpy or 0 not in sizes, "legacy NDArrays cannot hold an empty batch: --numpy"
    bn_only = args.dtype != "float32" or 0 in sizes
    channels = 6
    in_ch = channels if bn_only else 3
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])

    bn_dims = args.ndim if args.axis == 1 else None  # the book's num_dims: NC and NCHW
    ref = build(lambda: gluon.nn.BatchNorm(in_channels=channels, axis=args.axis), args.ndim,
                channels, seed=1, bn_only=bn_only, axis=args.axis)
    if args.layer == "contrib":
        def layer(c, dims, axis):
            return mx.gluon.contrib.nn.SyncBatchNorm(in_channels=c, num_devices=len(devices))
    else:
        layer = distbn.SyncBatchNorm if args.layer == "sync" else distbn.BatchNorm
    # With empty batches the layer is hybridized on its own: a compiled graph around it would
    # hold MXNet's own operators, which take no empty batch.
    net = build(lambda: layer(channels, bn_dims, axis=args.axis), args.ndim, channels, seed=2,
                hybridize=args.hybridize and 0 not in sizes, bn_only=bn_only, axis=args.axis,
                ctx=devices)
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

    parts = [(c, cuts[d], cuts[d + 1]) for d, c in enumerate(devices)]  # this worker's slices
    lr = 0.5
    ref_tr = gluon.Trainer(ref.collect_params(), "sgd", {"learning_rate": lr})
    if args.trainer == "horovod":
        import horovod.mxnet as hvd
        net_tr = hvd.DistributedTrainer(net.collect_params(), "sgd", {"learning_rate": lr})
    else:
        net_tr = comm.trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    bn_ref, bn_net = (ref[0], net[0]) if bn_only else (ref[1], net[1])
    for step in range(1, args.steps + 1):
        xg = (args.mean + rs.randn(*shape_in)).astype(dtype)
        w = rs.randn(*out_shape).astype(dtype)  # per-output loss weights
        xr = array(xg, dtype=dtype)
        xr.attach_grad()
        with autograd.record():
            yr = ref(xr); lr_ = (yr * array(w, dtype=dtype)).sum()
        lr_.backward()
        xs = [array(xg[lo:hi][a:b], dtype=dtype, ctx=c) for c, a, b in parts]
        for x in xs:
            x.attach_grad()
        before = comm.collectives
        ys = run_devices(net, xs, [array(w[lo:hi][a:b], dtype=dtype, ctx=c) for c, a, b in parts],
                         args.loop)
        nd.waitall()
        per_step = comm.collectives - before
        want_coll = 2 if size > 1 and args.layer == "sync" else 0
        if per_step != want_coll:
            print(f"MISMATCH step {step}: {per_step} collectives, expected {want_coll}", flush=True)
            ok = False
        ok &= all(y.dtype == x.dtype and x.grad.dtype == x.dtype for x, y in zip(xs, ys)) or \
            _say(f"dtypes {ys[0].dtype}, {xs[0].grad.dtype}")
        if total == 0:  # the reference would be Gluon's NaN: PyTorch's rules instead
            ref_y, ref_dx = np.zeros(shape_in), np.zeros(shape_in)
            ref_grads = {p: np.zeros(channels) for p in ("gamma", "beta")}
            ref_stats = {"running_mean": np.zeros(channels), "running_var": np.ones(channels)}
        else:
            ref_y, ref_dx = yr.asnumpy(), xr.grad.asnumpy()
            ref_grads = {p: getattr(bn_ref, p).grad().asnumpy() for p in ("gamma", "beta")}
            ref_stats = {p: getattr(bn_ref, p).data().asnumpy() for p in ("running_mean", "running_var")}
        for (c, a, b), x, y in zip(parts, xs, ys):
            ok &= close(f"output on {c}", y.asnumpy(), ref_y[lo:hi][a:b], step, rtol)
            ok &= close(f"input grad on {c}", x.grad.asnumpy(), ref_dx[lo:hi][a:b], step, rtol)
        for pname in ("gamma", "beta"):  # summed over this worker's devices, then the workers
            g = sum(getattr(bn_net, pname).grad(c).asnumpy().reshape(-1) for c in devices)
            gsum = comm.allreduce_sum(nd.array(g, dtype=g.dtype), name=f"test.{pname}.{step}").asnumpy()
            ok &= close(f"{pname} grad (summed)", gsum, ref_grads[pname], step, rtol)
        for pname, c in ((p, c) for p in ("running_mean", "running_var") for c in devices):
            ok &= close(f"{pname} on {c}", getattr(bn_net, pname).data(c).asnumpy().ravel(),
                        ref_stats[pname], step, rtol)
        ref_tr.step(max(total, 1))
        net_tr.step(max(total, 1) / size)  # DistributedTrainer averages over workers: sum/total
    # Prediction mode never communicates and uses the (identical) moving statistics.
    before = comm.collectives
    xg = (args.mean + rs.randn(*shape_in)).astype(dtype)
    want = ref(array(xg, dtype=dtype)).asnumpy()[lo:hi] if total else np.zeros(shape_in)
    for c, a, b in parts:
        got = net(array(xg[lo:hi][a:b], dtype=dtype, ctx=c)).asnumpy()
        ok &= close(f"prediction output on {c}", got, want[a:b], "predict", rtol)
    if comm.collectives != before:
        print("MISMATCH: prediction mode issued a collective", flush=True)
        ok = False
    via = "gloo" if comm.engine else "none"
    mode = f" axis={args.axis}" * (args.axis != 1) + " numpy" * args.numpy
    mode += f" devices={mine} loop={args.loop}" * (len(devices) > 1)
    print(f"rank {rank}/{size} sizes={sizes} ndim={args.ndim}{mode} dtype={dtype} via={via} "
          f"hybridized={args.hybridize}: "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
