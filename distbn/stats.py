"""Batch-norm statistics as pure math, with no communication.

The sync layer runs ``local moments -> pack -> all-reduce(sum) -> unpack``; this module holds
everything but the all-reduce, so it is the same code at every world size.

Why the packing is safe from the first batch: each worker sends ``(n, n*m, n*(v + m*m))`` in
float64, where ``m`` and ``v`` are its own mean and *centred* variance (two-pass, computed by
``nd.moments``). The global variance ``Q/N - mu^2`` then equals
``sum n_i v_i / N + sum n_i (m_i - mu)^2 / N`` exactly; float64 carries the cancellation in it
to about 1e-16 * mu^2, i.e. 1e-8 for a mean of 1e4, far below any variance float32 can resolve
at that magnitude. A raw float32 ``E[x^2] - E[x]^2`` loses everything there (MXNet's own fused
CPU BatchNorm reports a std of ~10 for data of std 0.1 around 1e4 at LeNet's conv1 shape).
"""
from __future__ import annotations

from mxnet import nd


_CONSTANTS: dict = {}  # (shape, value, ctx) -> array: made once per shape and device
# With var = 1 - 2**-16 and eps = 2**-16, sqrt(var + eps) is exactly 1 in float32, so the
# fused kernel in affine() computes a plain per-channel affine map.
_UNIT_EPS = 2.0 ** -16


def const(shape: tuple, value: float, ctx) -> nd.NDArray:
    key = (shape, value, ctx)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = nd.full(shape, value, ctx=ctx)
    return _CONSTANTS[key]


def check_input(x: nd.NDArray) -> None:
    if x.ndim not in (2, 4):
        raise ValueError(f"batch norm takes 2-D (N, C) or 4-D (N, C, H, W) input, got {x.shape}")


def channel_sum(z: nd.NDArray, scale: float = 1.0) -> nd.NDArray:
    """``scale`` times the per-channel sum over all axes but 1, as matrix-vector products: (C,).

    MXNet's own reductions over axes (0, 2, 3) run ~14x slower on the CPU (10 ms against 0.7
    ms at LeNet's conv1 shape, batch 256); BLAS also sums in blocks, which rounds less.
    """
    n, c = z.shape[:2]
    per_position = nd.dot(const((1, n), scale, z.context), z.reshape((n, -1)))  # (1, C*H*W)
    if z.ndim == 2:
        return per_position.reshape(-1)
    hw = z.size // (n * c)
    return nd.dot(per_position.reshape((c, hw)), const((hw, 1), 1.0, z.context)).reshape(-1)


def affine(x: nd.NDArray, scale: nd.NDArray, shift: nd.NDArray) -> nd.NDArray:
    """``scale * x + shift`` per channel, (C,) each, in one pass of MXNet's fused kernel
    (its broadcast_mul/broadcast_add cost ~3x an element-wise op on the CPU)."""
    c = x.shape[1]
    return normalize(x, scale, shift, const((c,), 0.0, x.context),
                     const((c,), 1.0 - _UNIT_EPS, x.context), _UNIT_EPS)


def local_moments(x: nd.NDArray):
    """Per-channel mean and biased variance of ``x``, (C,) float32 each.

    Sums are taken of ``d = x - shift``, with ``shift`` the first value of each channel: ``d``
    is of the order of the spread whatever the offset of the data, so neither the sum nor the
    sum of squares loses digits (a float32 sum of 256 values near 1e4 is off by ~1e-3, 1% of a
    spread of 0.1), and ``var = E[d^2] - E[d]^2`` cancels only a few digits.
    """
    c = x.shape[1]
    inv_count = 1.0 / (x.size // c)
    corner = (0,) * x.ndim
    shift = nd.slice(x, begin=corner, end=(1, c) + (1,) * (x.ndim - 2)).reshape(-1)
    d = affine(x, const((c,), 1.0, x.context), -shift)
    mean_d = channel_sum(d, inv_count)
    # E[d^2] >= E[d]^2 but for rounding, far below the eps added to var before use.
    var = channel_sum(nd.square(d), inv_count) - mean_d * mean_d
    return shift + mean_d, var


def pack_moments(mean: nd.NDArray, var: nd.NDArray, count: int) -> nd.NDArray:
    """(1 + 2C,) float64: ``[n, n*mean (C), n*(var + mean^2) (C)]`` -- summable across workers."""
    m = mean.astype("float64")
    n = nd.full((1,), count, ctx=mean.context, dtype="float64")
    return nd.concat(n, m * count, (var.astype("float64") + m * m) * count, dim=0)


def unpack_moments(total: nd.NDArray, channels: int):
    """Inverse of a sum of :func:`pack_moments`: global (mean, var, count), float32.

    ``count`` is a (1,) array, kept on the device so nothing waits for the collective here.
    """
    n = total[0:1]
    mean = nd.broadcast_div(total[1:1 + channels], n)
    var = nd.relu(nd.broadcast_div(total[1 + channels:], n) - mean * mean)  # clamp rounding below 0
    return mean.astype("float32"), var.astype("float32"), n.astype("float32")


def normalize(x, gamma, beta, mean, var, eps: float):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, MXNet's fused kernel (one pass).

    ``use_global_stats`` makes the kernel take ``mean``/``var`` as given instead of computing
    its own batch statistics (which it sums in float32, one value after another: at LeNet's
    conv1 shape, data of std 0.1 around 1e4 come out with a std of ~10).
    """
    return nd.BatchNorm(x, gamma, beta, mean, var, eps=eps, fix_gamma=False,
                        use_global_stats=True, axis=1)


def blend(moving: nd.NDArray, batch: nd.NDArray, momentum: float) -> None:
    """In place: ``moving = momentum * moving + (1 - momentum) * batch`` (MXNet convention).

    One fused op: sgd_update computes ``w - lr * (rescale * g + wd * w)``, which with
    ``g = batch``, ``rescale = -1``, ``wd = 1`` and ``lr = 1 - momentum`` is the average above.
    """
    nd.sgd_update(moving, batch.reshape(moving.shape), lr=1.0 - momentum, wd=1.0,
                  rescale_grad=-1.0, out=moving)
