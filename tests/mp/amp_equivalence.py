"""Worker: a network with synced BN under MXNet's AMP on N workers is as close to the float64
truth as the same network with Gluon's BN under the same AMP in one process on the
concatenated batch.

--amp bfloat16: ``amp.convert_hybrid_block(net, target_dtype="bfloat16")``, the CPU's flow, on
  a network of convolutions, BN, ReLU, pooling and a dense layer.
--amp float16: the GPU's flow, ``amp.init()`` before the networks are built, loss scaling by
  ``amp.init_trainer`` / ``amp.scale_loss`` (distbn's network with Horovod's trainer). MXNet
  has no float16 convolution or dense layer on the CPU, so here the networks are BN, ReLU, BN
  fed float16 data (both cast to float16, which keeps BN's parameters float32).

Every rank builds the same global batch and weights from fixed seeds and computes:
  truth   Gluon's network cast to float64, whole batch (outputs, parameter gradients)
  gluon   Gluon's network under AMP, whole batch
  distbn  the network with --layer's BN under AMP, this rank's slice; parameter gradients
          summed over workers
and checks, for the outputs and every parameter's gradient, that distbn's relative error
against the truth is at most SLACK times Gluon's plus one rounding of the low precision
(2^-8 for bfloat16, 2^-11 for float16): both are of the order of that resolution, and where a
quantity is a single rounding (a dense layer's bias gradient, a sum of the loss weights
rounded once per worker here, once in Gluon's) two independent roundings differ by a factor
of two. With
``--layer local`` (distbn.BatchNorm: each worker's own statistics) the errors are those of
the wrong statistics, O(1): the check must FAIL. Exits non-zero on a failed check.

    horovodrun -np 4 python tests/mp/amp_equivalence.py
"""
import argparse
import sys

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd
from mxnet.contrib import amp

import distbn
from distbn.comm import get_comm

SLACK = 1.5  # distbn's error may be this multiple of Gluon-AMP's own, plus EPS
EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # unit roundoff


def build(bn, seed, precision):
    net = gluon.nn.HybridSequential()
    if precision == "bfloat16":
        # Convolutions before BN without a bias, as in ResNets: BN cancels a bias, whose true
        # gradient is then 0 and has no relative error to compare.
        net.add(gluon.nn.Conv2D(8, 3, padding=1, use_bias=False), bn(),
                gluon.nn.Activation("relu"),
                gluon.nn.Conv2D(8, 3, padding=1, use_bias=False), bn(),
                gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(5))
    else:
        net.add(bn(), gluon.nn.Activation("relu"), bn())
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    return net


def trained_params(net):
    return [p for p in net.collect_params().values() if p.grad_req != "null"]


def under_amp(net, x, precision):
    """``net`` hybridized and, for bfloat16, traced on ``x`` and converted by MXNet's AMP
    (float16: ``amp.init()`` already changed the operators the graph is built from)."""
    net.hybridize(static_alloc=True)
    if precision == "float16":
        net.cast("float16")
        return net
    net(x)
    return amp.convert_hybrid_block(net, target_dtype="bfloat16", ctx=mx.cpu())


def run(net, x, w, names, trainer=None):
    """Output and the gradients of sum(net(x) * w), by the original parameters' names; with
    a trainer, through AMP's loss scaling (gradients unscaled here), then one step."""
    with autograd.record():
        y = net(x)
        loss = (y.astype("float64") * w).sum()
        if trainer is None:
            scale = 1.0
            loss.backward()
        else:
            scale = trainer._amp_loss_scaler.loss_scale
            with amp.scale_loss(loss, trainer) as scaled:
                autograd.backward(scaled)
    params = net.collect_params()
    grads = [params[n].grad().astype("float64").asnumpy() / scale for n in names]
    if trainer is not None:
        trainer.step(1)
        if any(not np.isfinite(params[n].data().asnumpy()).all() for n in names):
            raise SystemExit("MISMATCH: a parameter is not finite after the AMP step")
    return y.astype("float64").asnumpy(), grads


def rel(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-worker", type=int, default=4)
    ap.add_argument("--amp", choices=list(EPS), default="bfloat16")
    ap.add_argument("--layer", choices=["sync", "local"], default="sync",
                    help="local: distbn.BatchNorm, a negative control that must FAIL at size > 1")
    args = ap.parse_args()
    precision = args.amp
    if precision == "float16":
        amp.init(target_dtype="float16")  # before any network is built, as AMP wants
    comm = get_comm()
    rank, size = comm.rank, comm.size
    n = args.per_worker
    lo, hi = rank * n, (rank + 1) * n
    rs = np.random.RandomState(7)
    xg = (0.5 + rs.randn(n * size, 3, 8, 8)).astype(np.float32)
    if precision == "float16":
        xg = xg.astype(np.float16).astype(np.float32)  # the same data for the truth
    wg = rs.randn(n * size, *((5,) if precision == "bfloat16" else xg.shape[1:]))

    layer = distbn.SyncBatchNorm if args.layer == "sync" else distbn.BatchNorm
    nets = {"truth": build(gluon.nn.BatchNorm, 1, precision),
            "gluon": build(gluon.nn.BatchNorm, 1, precision), "distbn": build(layer, 1, precision)}
    for net in nets.values():
        net(nd.array(xg[:2]))  # shapes; then every network gets the truth's weights
    src = trained_params(nets["truth"])
    for key in ("gluon", "distbn"):
        for p, q in zip(src, trained_params(nets[key])):
            q.set_data(p.data())
    names = {k: [p.name for p in trained_params(net)] for k, net in nets.items()}

    truth = nets["truth"]
    truth.cast("float64")
    want = run(truth, nd.array(xg, dtype="float64"), nd.array(wg, dtype="float64"),
               names["truth"])
    data = "float16" if precision == "float16" else "float32"
    gl = under_amp(nets["gluon"], nd.array(xg, dtype=data), precision)
    db = under_amp(nets["distbn"], nd.array(xg[lo:hi], dtype=data), precision)
    trainers = {"gluon": None, "distbn": None}
    if precision == "float16":  # AMP's loss scaling, through Horovod's trainer for distbn
        trainers = {"gluon": gluon.Trainer(gl.collect_params(), "sgd", {"learning_rate": 0.1}),
                    "distbn": comm.trainer(db.collect_params(), "sgd", {"learning_rate": 0.1})}
        for tr in trainers.values():
            amp.init_trainer(tr)
    got_gluon = run(gl, nd.array(xg, dtype=data), nd.array(wg, dtype="float64"),
                    names["gluon"], trainers["gluon"])
    before = comm.collectives
    y, grads = run(db, nd.array(xg[lo:hi], dtype=data), nd.array(wg[lo:hi], dtype="float64"),
                   names["distbn"], trainers["distbn"])
    synced = comm.collectives - before
    grads = [comm.allreduce_sum(nd.array(g, dtype="float64"), name=f"test.amp.{i}").asnumpy()
             for i, g in enumerate(grads)]

    ok = True
    # Two layers, forward and backward each; the float16 network's first BN reads the data,
    # which needs no gradient, so MXNet skips that layer's backward exchange.
    want_coll = (4 if precision == "bfloat16" else 3) if size > 1 and args.layer == "sync" else 0
    if synced != want_coll:
        print(f"MISMATCH: {synced} collectives in the step, expected {want_coll}", flush=True)
        ok = False
    checks = [("output", y, got_gluon[0][lo:hi], want[0][lo:hi])]
    checks += [(f"grad {name}", g, gg, wt)
               for name, g, gg, wt in zip(names["truth"], grads, got_gluon[1], want[1])]
    worst = 0.0
    for what, mine, theirs, truth_v in checks:
        e_mine, e_gluon = rel(mine, truth_v), rel(theirs, truth_v)
        worst = max(worst, e_mine / e_gluon)
        if e_mine > SLACK * e_gluon + EPS[precision]:
            print(f"MISMATCH {what}: distbn's error {e_mine:.3g}, Gluon-AMP's {e_gluon:.3g}",
                  flush=True)
            ok = False
    print(f"rank {rank}/{size} layer={args.layer} amp={precision} worst error ratio {worst:.3g}: "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
