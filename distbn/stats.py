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


def reduce_axes(ndim: int) -> tuple:
    """Axes the statistics are taken over: all but the channel axis 1."""
    if ndim == 2:
        return (0,)
    if ndim == 4:
        return (0, 2, 3)
    raise ValueError(f"batch norm takes 2-D (N, C) or 4-D (N, C, H, W) input, got {ndim}-D")


def local_moments(x: nd.NDArray):
    """Per-channel mean and biased (centred, two-pass) variance of ``x``, each (C,) float32."""
    return nd.moments(x, axes=reduce_axes(x.ndim))


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


def backward_sums(dy: nd.NDArray, x_centred: nd.NDArray, invstd: nd.NDArray):
    """Per-channel ``sum(dy)`` and ``sum(dy * x_hat)``, each (C,): the gradients of beta and gamma."""
    axes = reduce_axes(dy.ndim)
    sum_dy = nd.sum(dy, axis=axes)
    sum_dy_xhat = nd.sum(dy * x_centred, axis=axes) * invstd
    return sum_dy, sum_dy_xhat


def channel_view(v: nd.NDArray, ndim: int) -> nd.NDArray:
    """Reshape a (C,) vector so it broadcasts against (N, C) or (N, C, H, W)."""
    return v.reshape((1, -1) if ndim == 2 else (1, -1, 1, 1))


def input_grad(dy, x_centred, scale, invstd, sum_dy, sum_dy_xhat, inv_count):
    """dx = scale * (dy - sum_dy/N - x_hat * sum_dy_xhat/N), the sums taken over the global batch.

    ``scale = gamma * invstd`` (C,); ``inv_count`` is 1/N as a (1,) array.
    """
    ndim = dy.ndim
    k_mean = nd.broadcast_mul(scale * sum_dy, inv_count)                    # (C,)
    k_xc = nd.broadcast_mul(scale * invstd * sum_dy_xhat, inv_count)  # (C,): x_hat = x_centred * invstd
    dx = nd.broadcast_mul(dy, channel_view(scale, ndim))
    dx = dx - nd.broadcast_mul(x_centred, channel_view(k_xc, ndim))
    return nd.broadcast_sub(dx, channel_view(k_mean, ndim))


def normalize(x, gamma, beta, mean, var, eps: float):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` with MXNet's fused kernel (one pass).

    ``use_global_stats`` makes the kernel take ``mean``/``var`` as given instead of computing
    its own (numerically unsafe) batch statistics.
    """
    return nd.BatchNorm(x, gamma, beta, mean, var, eps=eps, fix_gamma=False,
                        use_global_stats=True, axis=1)


def blend(moving: nd.NDArray, batch: nd.NDArray, momentum: float) -> None:
    """In place: ``moving = momentum * moving + (1 - momentum) * batch`` (MXNet convention)."""
    moving[:] = momentum * moving + (1.0 - momentum) * batch.reshape(moving.shape)
