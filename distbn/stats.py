"""Batch-norm math as graph operators, with no communication.

A layer's training step is ``local statistics -> [sum over workers] -> normalize``:

    L = local_stats(x)          float64 (1 + 2C,): [n, n*m, n*(v + m^2)], m/v this worker's
    G = sum of L over workers   (the caller's all-reduce; G = L for local statistics)
    y = normalize(x, G, ...)    mean = G1/G0, var = G2/G0 - mean^2; updates the running stats

Every function takes ``F`` (``mx.nd`` or ``mx.sym``), so the same code runs imperatively and
inside a hybridized network. Two implementations compute the same values: distbn's C++
operators (:mod:`distbn.native`, the CPU) and the MXNet-operator versions below (GPUs, no
compiler, ``DISTBN_NATIVE=0``), whose gradients MXNet's autograd derives.

Why the packing is exact from the first batch: m and v are summed from data shifted by each
channel's first value, so the sums are of the order of the spread whatever the offset; the
global variance ``G2/G0 - mean^2`` is then formed in float64, which keeps ~1e-16 * mean^2 of
error (1e-8 for a mean of 1e4), far below what float32 data resolve there. MXNet's own fused
CPU BatchNorm, summing raw float32 values one after another, reports a std of ~10 for data of
std 0.1 around 1e4.

Training or prediction is decided when the graph runs, not when it is built (a hybridized
graph serves both): :func:`mode_probe` asks MXNet's BatchNorm, the one operator that knows.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

# |probe| stays ~1 in training and is ~PROBE / sqrt(running_var) in prediction.
PROBE = 1e15


def mode_probe(F, local, running_mean, running_var, dtype="float32"):
    """(2, C): MXNet's BatchNorm of [-PROBE, +PROBE] per channel with the layer's running
    statistics and momentum 1 (they are read, never changed). In training it normalizes
    with the batch statistics (about -1, +1); in prediction with the running ones (huge).
    ``dtype``: the running statistics' type (the layer's parameters'), which MXNet's BatchNorm
    wants its data in too.

    The channel count comes from ``local`` (this worker's :func:`local_stats`, a few values):
    MXNet's shape inference for extension operators miscounts inputs whose shape is not known
    at all yet, as the probe's would be if it came from deferred parameters."""
    sums = F.slice_axis(local, axis=0, begin=1, end=None).reshape((2, -1))
    zero = F.zeros_like(F.cast(F.slice_axis(sums, axis=0, begin=0, end=1).reshape((-1,)), dtype))
    z = F.stack(zero - PROBE, zero + PROBE, axis=0)
    return F.BlockGrad(F.BatchNorm(z, F.ones_like(zero), zero, running_mean, running_var,
                                   momentum=1.0, fix_gamma=True, axis=1))


def channels_in_middle(F, x, axis: int):
    """``x`` viewed as (A, C, B): A the product of the axes before the channel ``axis``, B of
    those after it. Batch-norm statistics are over A and B, so every layout (NCHW, NHWC, NC,
    NWC, NDHWC, ...) goes through the same operators as (N, C, rest), with no transpose. Only
    reshapes, whose codes need no ndim (a graph's inputs have none when it is traced):
    ``-3`` merges two axes from the left; with ``reverse`` the codes count from the right.
    An array (imperative) gets its shape spelled out instead: MXNet's reshape divides by the
    known sizes to infer ``-1``, which fails on an empty batch."""
    if hasattr(x, "shape"):
        a = axis % len(x.shape)
        before, after = x.shape[:a], x.shape[a + 1:]
        return F.reshape(x, (int(np.prod(before)), x.shape[a], int(np.prod(after))))
    if axis == 0:
        return F.reshape(F.expand_dims(x, axis=0), (0, 0, -1))
    if axis > 0:
        for _ in range(axis - 1):        # (d0, d1, ..., C, ...) -> (d0*d1, ..., C, ...)
            x = F.reshape(x, (-3, -2))
        return F.reshape(x, (0, 0, -1))
    for _ in range(-axis - 2):           # (..., C, ..., dk, dl) -> (..., C, ..., dk*dl)
        x = F.reshape(x, (-2, -3), reverse=True)
    if axis == -1:
        return F.reshape(F.reshape(x, (-1, 0), reverse=True), (0, 0, 1))
    return F.reshape(x, (-1, 0, 0), reverse=True)


def local_stats(F, x, native: bool):
    """This worker's packed statistics ``L`` (see the module docstring)."""
    if native:
        return F.distbn_bn_stats(x)
    x3, shift = _with_shift(F, x)
    d = F.broadcast_sub(x3, shift)
    shape = F.BlockGrad(F.cast(F.shape_array(x), "float64"))
    n = F.prod(shape, keepdims=True) / F.slice_axis(shape, axis=0, begin=1, end=2)  # (1,)
    mean_d = F.broadcast_div(F.cast(_channel_sum(F, d), "float64"), n)
    var = F.relu(F.broadcast_div(F.cast(_channel_sum(F, F.square(d)), "float64"), n)
                 - F.square(mean_d))
    mean = F.cast(shift.reshape((-1,)), "float64") + mean_d
    return F.concat(n, F.broadcast_mul(n, mean), F.broadcast_mul(n, var + F.square(mean)), dim=0)


def normalize(F, x, G, probe, gamma, beta, running_mean, running_var, *, eps: float,
              momentum: float, fix_gamma: bool, native: bool, dtype="float32"):
    """``y`` of batch norm with the statistics in ``G`` (training) or the running ones
    (prediction, per ``probe``); in training the running statistics move towards ``G``'s:
    ``running = momentum * running + (1 - momentum) * batch`` (biased variance).

    The input gradient comes in two parts that MXNet adds: through ``x`` here
    (``gamma * invstd * dy``) and through ``G``, back through the all-reduce and
    :func:`local_stats` (the statistics' share, summed over workers). ``x`` and the
    parameters have type ``dtype`` (float32, float64 after ``net.cast('float64')``)."""
    if native:
        return F.distbn_bn_apply(x, G, probe, gamma, beta, running_mean, running_var, eps=eps,
                                 momentum=momentum, fix_gamma=fix_gamma)
    training = F.broadcast_like(F.abs(F.slice(probe, begin=(0, 0), end=(1, 1))).reshape((1,)) < 2,
                                running_mean)  # (C,) of 1.0 in training, 0.0 in prediction
    n = F.slice_axis(G, axis=0, begin=0, end=1)
    sums = F.broadcast_div(F.slice_axis(G, axis=0, begin=1, end=None).reshape((2, -1)),
                           n.reshape((1, 1)))
    batch_mean = F.slice_axis(sums, axis=0, begin=0, end=1).reshape((-1,))
    batch_var = F.relu(F.slice_axis(sums, axis=0, begin=1, end=2).reshape((-1,))
                       - F.square(batch_mean))
    batch_mean, batch_var = F.cast(batch_mean, dtype), F.cast(batch_var, dtype)
    mean = F.where(training, batch_mean, running_mean)
    var = F.where(training, batch_var, running_var)
    scale = (F.ones_like(gamma) if fix_gamma else gamma) * F.rsqrt(var + eps)
    x3, shift = _with_shift(F, x)  # y = (x - shift) * scale + beta + (shift - mean) * scale
    bias = beta + (shift.reshape((-1,)) - mean) * scale
    bias = _after(F, bias, _update_running(F, batch_mean, batch_var, running_mean, running_var,
                                           momentum))
    y3 = F.broadcast_add(F.broadcast_mul(F.broadcast_sub(x3, shift), scale.reshape((1, -1, 1))),
                         bias.reshape((1, -1, 1)))
    return F.reshape_like(y3, x)


def _channel_sum(F, z3):
    """Sum over axes 0 and 2 of (N, C, rest) ``z3``, (C,), as two matrix-vector products:
    MXNet's own reduction over those axes runs ~14x slower on the CPU (10 ms against 0.7 ms at
    LeNet's conv1 shape, batch 256), and BLAS sums in blocks, which rounds less."""
    first = F.slice_axis(z3, axis=0, begin=0, end=1)                             # (1, C, rest)
    ones_n = F.ones_like(F.slice_axis(F.slice_axis(z3, axis=1, begin=0, end=1), axis=2,
                                      begin=0, end=1)).reshape((1, -1))          # (1, N)
    ones_rest = F.ones_like(F.slice_axis(first, axis=1, begin=0, end=1)).reshape((-1, 1))
    per_position = F.dot(ones_n, F.reshape(z3, (0, -1)))                        # (1, C*rest)
    per_channel = F.reshape_like(per_position, first).reshape((-3, 0))           # (C, rest)
    return F.dot(per_channel, ones_rest).reshape((-1,))


def _corner(F, x3):
    """(1, C, 1): the first value of each channel of ``x3``, (N, C, rest)."""
    return F.slice_axis(F.slice_axis(x3, axis=0, begin=0, end=1), axis=2, begin=0, end=1)


def _with_shift(F, x):
    """x viewed as (N, C, rest) and each channel's first value, (1, C, 1), a constant to
    autograd (batch norm does not depend on it)."""
    x3 = F.reshape(x, (0, 0, -1))
    return x3, F.BlockGrad(_corner(F, x3))


def _update_running(F, batch_mean, batch_var, running_mean, running_var, momentum: float):
    """Moves the running statistics towards the batch's in training (MXNet's ``is_train``),
    leaves them alone in prediction. Returns a (C,) zero that must be consumed (see
    :func:`_after`). A graph can change a variable only through an operator that mutates an
    input; MXNet's optimizer operators, which do, cannot be composed as symbols, so this is a
    small Python operator whose auxiliary states are the running statistics."""
    return F.Custom(F.BlockGrad(batch_mean), F.BlockGrad(batch_var), running_mean, running_var,
                    op_type=_RUNNING_OP, momentum=momentum)


def _after(F, value, dep):
    """``value``, unchanged, in a node that also depends on ``dep`` (same shape): a graph runs
    only what its outputs need, so the running-statistics update hangs on the output's path."""
    return F._internal._identity_with_attr_like_rhs(value, dep)


_RUNNING_OP = "distbn_running_update"


class _RunningUpdate(mx.operator.CustomOp):
    def __init__(self, momentum: float):
        super().__init__()
        self._m = float(np.float32(momentum))  # MXNet's BatchNorm keeps it as a float32

    def forward(self, is_train, req, in_data, out_data, aux):
        if is_train:  # running = m * running + (1 - m) * batch
            for running, batch in zip(aux, in_data):
                running[:] = self._m * running + (1.0 - self._m) * batch
        self.assign(out_data[0], req[0], mx.nd.zeros_like(in_data[0]))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        for i, r in enumerate(req):
            self.assign(in_grad[i], r, mx.nd.zeros_like(in_data[i]))


@mx.operator.register(_RUNNING_OP)
class _RunningUpdateProp(mx.operator.CustomOpProp):
    def __init__(self, momentum):
        super().__init__(need_top_grad=False)
        self._momentum = float(momentum)

    def list_arguments(self):
        return ["batch_mean", "batch_var"]

    def list_auxiliary_states(self):
        return ["running_mean", "running_var"]

    def list_outputs(self):
        return ["done"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], [in_shape[0], in_shape[0]]

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _RunningUpdate(self._momentum)
