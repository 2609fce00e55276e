"""Worker: a model-zoo network converted to SyncBatchNorm and hybridized, on N workers, equals
the same network with gluon.nn.BatchNorm in one process on the concatenated batch.

Every rank builds the global batches from a fixed seed and trains, for a few SGD steps with
momentum: its own converted copy on its slice (DistributedTrainer), and one-process references
on the whole batch with Gluon's BN: one in float64 and REFS32 in float32. oneDNN stays as
MXNet ships it (on).

"Equal" is judged against float32's own noise. Deep networks at 2-4 examples per worker
amplify rounding from step to step, and a rounding difference that moves a max-pool or ReLU
decision reroutes a gradient outright: Gluon's BN with oneDNN on and off differ by up to half
a parameter's size after 3 steps here, so a fixed tolerance would either pass anything or fail
Gluon itself. The float64 run is the exact answer. The float32 references, fed the batch in
different orders (same math, other rounding), show how far float32 gets from it: the floor of
a quantity is the largest of their errors. Training outputs of each step and prediction
outputs must be within FACTOR times their floor of the exact answer; all parameters together
(running statistics included; L2 norm of the error) within L2_FACTOR times; and each parameter
within FACTOR times its floor or PARAM_RTOL of its size (at least PARAM_MIN_SCALE). The last
allowance is for a single activation that sits on a ReLU or max-pool edge: at 4 workers
(whose summation order varies from run to run, and whose 2-example convolutions round
otherwise than the references' 8-example ones) one such flip was seen to move 3 parameters of
one block by up to 1% (a beta of size ~1e-3 by 3.7e-5) in 2 runs of 9, with the L2 criterion
still at 1.4-1.7. Gluon's local BN on N workers (the negative
control) misses by orders of magnitude. Exits non-zero on any miss.

    horovodrun -np 2 python tests/mp/zoo_equivalence.py --arch resnet18_v1 --per-worker 2
    ... --layer gluon    # negative control: Gluon's local BN on N workers must FAIL
"""
import argparse
import os
import sys

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd
from mxnet.gluon.model_zoo import vision

import distbn
from distbn.comm import get_comm

FACTOR, L2_FACTOR, PARAM_RTOL, PARAM_MIN_SCALE, REFS32 = 20.0, 3.0, 2e-2, 1e-2, 3


ARRAY = [nd.array]  # mx.np.array in numpy mode (--numpy)


def build(arch: str, x0, dtype="float32"):
    mx.random.seed(1)
    net = vision.get_model(arch, classes=10)
    net.initialize(mx.init.Xavier())
    net(x0)  # channels are deferred in the model zoo: one forward fixes every shape
    if dtype != "float32":
        net.cast(dtype)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def train(net, trainer, batches, rows, comm=None):
    """Trains on ``rows`` of each batch but the last (in that order); returns the outputs of
    each training step and of the prediction of the last batch, in sorted row order, and
    distbn's collectives (the trainer's are Horovod's) of each."""
    dtype = next(iter(net.collect_params().values())).dtype
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    back = np.argsort(rows)
    outs, counts = [], []
    for i, (x, label) in enumerate(batches):
        before = comm.collectives if comm else 0
        data = ARRAY[0](x[rows], dtype=dtype)
        if i == len(batches) - 1:
            outs.append(net(data).asnumpy()[back].astype(np.float64))
        else:
            # An input gradient makes MXNet run every BN layer's backward pass, where Gluon's
            # BN updates its running statistics (a Gluon BN layer on the raw input never does
            # otherwise, see the README; distbn's does in forward).
            data.attach_grad()
            with autograd.record():
                y = net(data)
                loss = loss_fn(y, ARRAY[0](label[rows], dtype=dtype)).sum()
            loss.backward()
            trainer.step(len(rows))
            outs.append(y.asnumpy()[back].astype(np.float64))
        nd.waitall()
        counts.append(comm.collectives - before if comm else 0)
    return outs, counts


def values(outs, net):
    return outs + [p.data().asnumpy().astype(np.float64)
                   for _, p in sorted(net._collect_params_with_prefix().items())]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18_v1")
    ap.add_argument("--per-worker", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--image", type=int, default=28, help="input height and width (1 channel)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--layer", choices=["sync", "gluon"], default="sync")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--numpy", action="store_true", help="MXNet's numpy mode, mx.np arrays")
    args = ap.parse_args()
    if args.numpy:
        mx.npx.set_np()
        ARRAY[0] = mx.np.array
    comm = get_comm()
    rank, size = comm.rank, comm.size
    total = args.per_worker * size
    mine = np.arange(rank * args.per_worker, (rank + 1) * args.per_worker)
    rs = np.random.RandomState(args.seed)
    shape = (total, 1, args.image, args.image)
    x0 = ARRAY[0](rs.rand(*shape), dtype="float32")
    batches = [(0.5 + rs.randn(*shape), rs.randint(0, 10, total)) for _ in range(args.steps + 1)]
    opt = {"learning_rate": args.lr, "momentum": 0.9}

    def reference(dtype, rows):  # one process, whole batch, Gluon's BN
        ref = build(args.arch, x0, dtype)
        outs, _ = train(ref, gluon.Trainer(ref.collect_params(), "sgd", opt), batches, rows)
        return values([o[mine] for o in outs], ref)

    exact = reference("float64", np.arange(total))
    floats = [reference("float32", np.arange(total) if i == 0 else rs.permutation(total))
              for i in range(REFS32)]

    net = build(args.arch, x0[:args.per_worker])
    if args.layer == "sync":
        net = distbn.convert_sync_batchnorm(net)
    n_bn = sum(isinstance(b, (distbn.SyncBatchNorm, gluon.nn.BatchNorm)) for b in _blocks(net))
    # DistributedTrainer averages over workers: stepping by the local count makes sum / total.
    outs, counts = train(net, comm.trainer(net.collect_params(), "sgd", opt), batches, mine,
                         comm)
    got = values(outs, net)

    n_out = args.steps + 1
    names = [f"step {i + 1} training output" for i in range(args.steps)] + ["prediction output"]
    names += sorted(k for k, _ in net._collect_params_with_prefix().items())
    ok, ratios, rel_floor, sq_err, sq_floor = True, [], 0.0, 0.0, 0.0
    for i, (name, e, g) in enumerate(zip(names, exact, got)):
        fs = [f[i] for f in floats]
        if not all(np.isfinite(a).all() for a in [e, g, *fs]):
            print(f"MISMATCH {name}: non-finite values", flush=True)
            ok = False
            continue
        scale = max(np.abs(e).max(), 1e-3)
        floor = max(max(np.abs(f - e).max() for f in fs), 1e-7 * scale)
        err = np.abs(g - e).max()
        ratios.append(err / floor)
        rel_floor = max(rel_floor, floor / scale)
        if i >= n_out:
            sq_err += np.square(g - e).sum()
            sq_floor += max(np.square(f - e).sum() for f in fs)
        if os.environ.get("ZOO_DEBUG"):
            print(f"  {name}: error/floor {err / floor:.3g}, floor/scale {floor / scale:.2g}")
        allowance = PARAM_RTOL * max(scale, PARAM_MIN_SCALE) if i >= n_out else 0.0
        if err > max(FACTOR * floor, allowance):
            print(f"MISMATCH {name}: error {err:.3g} vs float32 floor {floor:.3g}", flush=True)
            ok = False
    l2 = np.sqrt(sq_err / sq_floor)
    if l2 > L2_FACTOR:
        print(f"MISMATCH parameters (L2): {l2:.3g} times the float32 floor", flush=True)
        ok = False
    # Two collectives per BN layer and training step; none in prediction. The backward one is
    # skipped where nothing upstream needs a gradient (here every layer does: see train()).
    want = [2 * n_bn if size > 1 and args.layer == "sync" else 0] * args.steps + [0]
    if counts != want:
        print(f"MISMATCH collectives per step {counts}, expected {want}", flush=True)
        ok = False
    print(f"rank {rank}/{size} {args.arch}{' numpy' * args.numpy} {args.layer} x{args.per_worker} ({n_bn} BN layers): "
          f"error/floor outputs {max(ratios[:n_out]):.3g}, parameters max "
          f"{max(ratios[n_out:]):.3g} median {np.median(ratios[n_out:]):.3g} L2 {l2:.3g} "
          f"(largest floor {rel_floor:.2g} of scale); collectives/step {counts[0]}"
          f"{' via gloo' if comm and comm.engine else ''}: "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    sys.exit(0 if ok else 1)


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)


if __name__ == "__main__":
    main()
