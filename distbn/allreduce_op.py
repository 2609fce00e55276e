"""A differentiable all-reduce (sum) as an MXNet graph operator, for the sync layer.

``allreduce(F, x, probe, key, ranks)`` sums ``x`` over the workers of ``ranks`` in forward and
sums the incoming gradient over them in backward (the gradient of a sum over workers, each of
which has its own loss). Two transports, chosen once per process by :func:`distbn.comm.get_comm`:

* the mesh (``comm.mesh``; CPU workers with distbn's C++ operators): ``distbn_allreduce``
  (``csrc/allreduce.cc``), a direct exchange over sockets inside MXNet's engine thread. It is
  told training from prediction by ``probe`` (:func:`distbn.stats.mode_probe`).
* Horovod (GPUs, no compiler, ``DISTBN_MESH=0``): the Python custom operator below. MXNet runs
  it on its custom-operator threads and it hands the collective to Horovod through
  :mod:`distbn.comm`, which writes the result straight into the operator's output. ~1.5 ms
  per collective on the CPU here, against ~0.1 ms over the mesh (docs/results.md).

It only ever sees the small packed statistics (float64, 1 + 2C values), never a convolution's
output, so oneDNN's blocked layouts cannot reach it. In prediction (``is_train`` False) it does
no collective and passes its input through.

Collectives are named ``distbn.<key>fwd`` / ``distbn.<key>bwd``: keys must be the same on
every worker and unique per layer (the layers use their Gluon prefix).
"""
from __future__ import annotations

import mxnet as mx

from .comm import get_comm

OP_TYPE = "distbn_allreduce"


def allreduce(F, x, probe, key: str, ranks: tuple = ()):
    """Sum of ``x`` over the workers (``ranks`` of a process set, or all when empty)."""
    ranks = ",".join(map(str, ranks))
    if get_comm().mesh:
        return F.distbn_allreduce(x, probe, key=f"distbn.{key}", ranks=ranks)
    return F.Custom(x, op_type=OP_TYPE, key=key, ranks=ranks)


class _Allreduce(mx.operator.CustomOp):
    def __init__(self, key: str, ranks: str):
        super().__init__()
        self._key = key
        comm = get_comm()
        self._group = comm.group([int(r) for r in ranks.split(",")]) if ranks else None
        self._training = False  # forward's mode, for the backward that follows it

    def forward(self, is_train, req, in_data, out_data, aux):
        self._training = is_train
        if is_train:
            self._reduce(in_data[0], req[0], out_data[0], "fwd")
        else:  # prediction: the layer uses its running statistics; no collective
            self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        if self._training:
            self._reduce(out_grad[0], req[0], in_grad[0], "bwd")
        else:
            self.assign(in_grad[0], req[0], out_grad[0])

    def _reduce(self, src, req: str, dst, phase: str) -> None:
        if req == "null":
            return
        name = f"distbn.{self._key}{phase}"
        if req == "add":
            self.assign(dst, req, get_comm().allreduce_sum(src, name, self._group))
        else:
            get_comm().allreduce_sum(src, name, self._group, out=dst)


@mx.operator.register(OP_TYPE)
class _AllreduceProp(mx.operator.CustomOpProp):
    # Backward needs only the incoming gradient, but declaring just that (Prop's
    # declare_backward_dependency) makes MXNet hand the Python side placeholder inputs that
    # it cannot wrap when run imperatively ("unknown storage type: -1"); the default keeps the
    # packed statistics, a few hundred bytes, alive until backward.
    def __init__(self, key: str, ranks: str = ""):
        super().__init__(need_top_grad=True)
        self._key, self._ranks = key, ranks

    def list_arguments(self):
        return ["data"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def infer_type(self, in_type):
        return in_type, [in_type[0]], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _Allreduce(self._key, self._ranks)
