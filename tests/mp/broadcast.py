"""Worker: distbn.broadcast_parameters after the sequence that breaks Horovod's broadcast (a
hybridized static_alloc model-zoo ResNet-18, a prediction-mode pass at batch 16: convolution
weights left in oneDNN's blocked layout, ../shared/STACK.md). Every rank starts from values of
its own; afterwards every parameter, running statistics included, must equal rank 0's. Exits
non-zero otherwise. ``--via horovod`` broadcasts with Horovod's own ``hvd.broadcast`` per
parameter instead: the control, which fails on oneDNN's layout. ``--devices 2``: every rank's
network lives on mx.cpu(0) and mx.cpu(1), whose copies are made to differ too (device 1's
copy of every parameter + 1): every copy of every worker must end equal to rank 0's first.

    horovodrun -np 2 python tests/mp/broadcast.py --bn sync
"""
import argparse
import hashlib
import sys

import mxnet as mx
from mxnet import nd
from mxnet.gluon.model_zoo import vision

import distbn


def digest(net, ctx) -> str:
    h = hashlib.sha256()
    for name, p in sorted(net.collect_params().items()):
        h.update(name.encode() + p.data(ctx).asnumpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bn", choices=["sync", "gluon"], default="sync")
    ap.add_argument("--via", choices=["distbn", "horovod"], default="distbn")
    ap.add_argument("--devices", type=int, default=1)
    args = ap.parse_args()
    comm = distbn.get_comm()
    net = vision.resnet18_v1(classes=10)
    if args.bn == "sync":
        distbn.convert_sync_batchnorm(net)
    mx.random.seed(comm.rank)  # different values on every rank
    ctxs = [mx.cpu(d) for d in range(args.devices)]
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    net.hybridize(static_alloc=True)
    net(nd.random.uniform(shape=(16, 1, 28, 28))).wait_to_read()  # prediction mode
    for p in net.collect_params().values():
        for copy in p.list_data()[1:]:
            copy += 1  # the devices of one worker differ too
    before = comm.allgather_object([digest(net, c) for c in ctxs])
    if args.via == "distbn":
        distbn.broadcast_parameters(net)
    else:
        import horovod.mxnet as hvd
        for name, p in sorted(net.collect_params().items()):
            p.set_data(hvd.broadcast(p.data(), root_rank=0, name=name))
    after = comm.allgather_object([digest(net, c) for c in ctxs])
    before = [d for worker in before for d in worker]
    after = [d for worker in after for d in worker]
    ok = (len(set(before)) == len(before) and len(set(after)) == 1 and after[0] == before[0])
    print(f"rank {comm.rank}/{comm.size} bn={args.bn} devices={args.devices} distinct copies "
          f"before: {len(set(before))}, after: {len(set(after))}: {'OK' if ok else 'FAILED'}",
          flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
