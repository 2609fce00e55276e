"""Batch-norm statistics as pure math, with no communication.

The sync layer runs ``local moments -> pack -> all-reduce(sum) -> unpack``; this module holds
everything but the all-reduce, so it is the same code at every world size.

Why the packing is safe from the first batch: each worker sends ``(n, n*m, n*(v + m*m))`` in
float64, where ``m`` and ``v`` are its own mean and variance, both summed from data shifted
near their centre (see :class:`_LocalMoments`). The global variance ``Q/N - mu^2`` then equals
``sum n_i v_i / N + sum n_i (m_i - mu)^2 / N`` exactly; float64 carries the cancellation in it
to about 1e-16 * mu^2, i.e. 1e-8 for a mean of 1e4, far below any variance float32 can resolve
at that magnitude. A raw float32 ``E[x^2] - E[x]^2`` loses everything there (MXNet's own fused
CPU BatchNorm reports a std of ~10 for data of std 0.1 around 1e4 at LeNet's conv1 shape).
"""
from __future__ import annotations

from mxnet import nd
from mxnet.gluon import HybridBlock


_CONSTANTS: dict = {}  # (shape, value, ctx) -> array: made once per shape and device
# With var = 1 - 2**-16 and eps = 2**-16, sqrt(var + eps) is exactly 1 in float32, so the
# fused BatchNorm kernel computes a plain per-channel affine map (used to shift the data).
_UNIT_EPS = 2.0 ** -16


def const(shape: tuple, value: float, ctx, dtype: str = "float32") -> nd.NDArray:
    key = (shape, value, ctx, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = nd.full(shape, value, ctx=ctx, dtype=dtype)
    return _CONSTANTS[key]


def _channel_sum(F, z, ones_n, ones_hw, channels: int):
    """Per-channel sum over all axes but 1 as matrix-vector products, scaled by ``ones_n``'s
    value: ``ones_n`` is (1, N), ``ones_hw`` (H*W, 1), (1, 1) for 2-D input. Returns (C,).

    MXNet's own reductions over axes (0, 2, 3) run ~14x slower on the CPU (10 ms against 0.7
    ms at LeNet's conv1 shape, batch 256); BLAS also sums in blocks, which rounds less.
    """
    per_position = F.dot(ones_n, z.reshape((0, -1)))  # (1, C*H*W)
    return F.dot(per_position.reshape((channels, -1)), ones_hw).reshape((-1,))


class _LocalMoments(HybridBlock):
    """x -> per-channel (mean, var), biased, (C,) float32 each; compiled into one call.

    Sums are taken of ``d = x - shift``, with ``shift`` the first value of each channel: ``d``
    is of the order of the spread whatever the offset of the data, so neither the sum nor the
    sum of squares loses digits (a float32 sum of 256 values near 1e4 is off by ~1e-3, 1% of a
    spread of 0.1), and ``var = E[d^2] - E[d]^2`` cancels only a few digits. ``d`` comes from
    one pass of the fused BatchNorm kernel used as a per-channel affine map (var + eps = 1).
    """

    def __init__(self, channels: int, ndim: int, **kwargs):
        super().__init__(**kwargs)
        self._c, self._ndim = channels, ndim

    def hybrid_forward(self, F, x, ones_n, ones_hw, one_c, zero_c, unit_var):
        corner = F.slice(x, begin=(0,) * self._ndim, end=(1, None) + (1,) * (self._ndim - 2))
        shift = corner.reshape((-1,))
        d = F.BatchNorm(x, one_c, -shift, zero_c, unit_var, eps=_UNIT_EPS, fix_gamma=False,
                        use_global_stats=True, axis=1)
        mean_d = _channel_sum(F, d, ones_n, ones_hw, self._c)
        mean_sq = _channel_sum(F, F.square(d), ones_n, ones_hw, self._c)
        # E[d^2] >= E[d]^2 but for rounding, far below the eps added to var before use.
        return shift + mean_d, mean_sq - mean_d * mean_d


def local_moments(x: nd.NDArray):
    """Per-channel mean and biased variance of 2-D or 4-D ``x``, (C,) float32 each."""
    n, c = x.shape[:2]
    hw = x.size // (n * c)
    ctx = x.context
    block = _compiled(_LocalMoments, c, x.ndim)
    return block(x, const((1, n), 1.0 / (n * hw), ctx), const((hw, 1), 1.0, ctx),
                 const((c,), 1.0, ctx), const((c,), 0.0, ctx), const((c,), 1.0 - _UNIT_EPS, ctx))


class _PackMoments(HybridBlock):
    """(mean, var, count) -> (1 + 2C,) float64 ``[n, n*mean (C), n*(var + mean^2) (C)]``,
    summable across workers. Compiled: one call instead of ~8 small ops, each ~0.1 ms on a
    busy CPU."""

    def hybrid_forward(self, F, mean, var, count):
        m = F.cast(mean, "float64")
        return F.concat(count, F.broadcast_mul(m, count),
                        F.broadcast_mul(F.cast(var, "float64") + m * m, count), dim=0)


class _UnpackMoments(HybridBlock):
    """Sum of packed moments -> global (mean, var, 1/N), float32 (C,), (C,), (1,)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self._c = channels

    def hybrid_forward(self, F, total):
        n = F.slice_axis(total, axis=0, begin=0, end=1)
        mean = F.broadcast_div(F.slice_axis(total, axis=0, begin=1, end=1 + self._c), n)
        sq = F.broadcast_div(F.slice_axis(total, axis=0, begin=1 + self._c, end=None), n)
        var = F.relu(sq - mean * mean)  # clamp rounding below 0
        return F.cast(mean, "float32"), F.cast(var, "float32"), F.cast(1.0 / n, "float32")


class _Correction(HybridBlock):
    """dx = d_part + k * (sum_dy_xhat * x_hat + sum_dy), k = -gamma*invstd/N per channel.

    ``sums`` is ``[sum(dy) (C), sum(dy * x_hat) (C)]`` over the global batch. One fused pass of
    the BatchNorm kernel computes the affine map of ``x_hat``; ``mean``/``var`` enter as graph
    inputs because the kernel needs them as variables.
    """

    def __init__(self, channels: int, eps: float, **kwargs):
        super().__init__(**kwargs)
        self._c, self._eps = channels, eps

    def hybrid_forward(self, F, x, d_part, sums, scale, inv_count, mean, var):
        k = -F.broadcast_mul(scale, inv_count)
        sum_dy = F.slice_axis(sums, axis=0, begin=0, end=self._c)
        sum_dy_xhat = F.slice_axis(sums, axis=0, begin=self._c, end=None)
        return d_part + F.BatchNorm(x, k * sum_dy_xhat, k * sum_dy, mean, var, eps=self._eps,
                                    fix_gamma=False, use_global_stats=True, axis=1)


_BLOCKS: dict = {}


def _compiled(cls, *args):
    """One hybridized instance per (class, arguments): compiled once, reused every step."""
    key = (cls, args)
    if key not in _BLOCKS:
        block = cls(*args)
        block.hybridize(static_alloc=True)
        _BLOCKS[key] = block
    return _BLOCKS[key]


def pack_moments(mean: nd.NDArray, var: nd.NDArray, count: int) -> nd.NDArray:
    """Summable local moments; see :class:`_PackMoments`."""
    n = const((1,), float(count), mean.context, "float64")
    return _compiled(_PackMoments)(mean, var, n)


def unpack_moments(total: nd.NDArray, channels: int):
    """Inverse of a sum of :func:`pack_moments`: global (mean, var, 1/N), float32.

    ``1/N`` is a (1,) array, kept on the device so nothing waits for the collective here.
    """
    return _compiled(_UnpackMoments, channels)(total)


def input_grad(x, d_part, sums, scale, inv_count, mean, var, eps: float) -> nd.NDArray:
    """The exact input gradient from the fused kernel's partial one; see :class:`_Correction`."""
    return _compiled(_Correction, x.shape[1], eps)(x, d_part, sums, scale, inv_count, mean, var)


class _LocalBatchNorm(HybridBlock):
    """Training-mode batch norm of this worker's batch alone -> ``(y, mean, var)``, compiled
    into one call forward and one backward (each MXNet call costs ~0.1 ms on a busy CPU, as
    much as the whole kernel on a dense layer's shapes).

    The whole forward and backward are MXNet's fused kernel, run on ``d = x - shift`` with
    ``shift`` each channel's first value (a constant to autograd: batch norm is invariant to
    it, gradients included). The kernel sums in float32 one value after another, which loses
    everything for data far from zero (std ~10 reported for 0.1 around 1e4); on ``d``, of the
    order of the spread, it is exact. One extra pass (the shift) buys that. ``scratch_mean`` /
    ``scratch_var`` receive the kernel's own moving averages (of ``d``), which are not used.
    """

    def __init__(self, ndim: int, eps: float, **kwargs):
        super().__init__(**kwargs)
        self._ndim, self._eps = ndim, eps

    def hybrid_forward(self, F, x, gamma, beta, scratch_mean, scratch_var, one_c, zero_c, unit_var):
        corner = F.slice(x, begin=(0,) * self._ndim, end=(1, None) + (1,) * (self._ndim - 2))
        shift = F.BlockGrad(corner.reshape((-1,)))
        d = F.BatchNorm(x, one_c, -shift, zero_c, unit_var, eps=_UNIT_EPS, fix_gamma=False,
                        use_global_stats=True, axis=1)  # x - shift; gradient 1 to x
        y, mean_d, invstd = F.BatchNorm(d, gamma, beta, scratch_mean, scratch_var, eps=self._eps,
                                        fix_gamma=False, output_mean_var=True, axis=1)
        # the kernel returns invstd = 1/sqrt(var + eps)
        var = F.BlockGrad(F.reciprocal(F.square(invstd)) - self._eps)
        return y, F.BlockGrad(shift + mean_d), var


def local_batch_norm_block(ndim: int, eps: float) -> _LocalBatchNorm:
    """A compiled :class:`_LocalBatchNorm` of its own: one per layer, never shared, so no two
    layers' recorded calls hold the same cached operator's buffers."""
    block = _LocalBatchNorm(ndim, eps)
    block.hybridize(static_alloc=True)
    return block


def local_batch_norm(block, x, gamma, beta, scratch_mean, scratch_var):
    """Training-mode batch norm over this worker's batch alone: ``(y, mean, var)``, (C,)
    statistics; ``block`` from :func:`local_batch_norm_block`."""
    c, ctx = x.shape[1], x.context
    return block(x, gamma, beta, scratch_mean, scratch_var, const((c,), 1.0, ctx),
                 const((c,), 0.0, ctx), const((c,), 1.0 - _UNIT_EPS, ctx))


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
