"""Gluon blocks: the book's ``BatchNorm`` and its synchronized variant ``SyncBatchNorm``.

With several workers, ``SyncBatchNorm`` trains as follows:

    forward:  local moments (C,) --[all-reduce 1: packed float64 (1 + 2C,)]--> global mean/var
              -> y = gamma * (x - mean) / sqrt(var + eps) + beta   (MXNet's fused kernel)
    backward: the fused kernel's backward gives sum(dy), sum(dy * x_hat) (C,) and gamma/sigma*dy
              --[all-reduce 2: packed (2C,)]--> :class:`_ExactStatsGrad` adds the terms through
              the statistics: dx = gamma/sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
              means over the global batch

``BatchNorm``, and ``SyncBatchNorm`` with a group of one, do no collective and use no
Function: on the CPU one C++ operator call each way (:mod:`distbn.native`), elsewhere (GPU, or
no compiler) MXNet's fused kernel on data shifted by one value per channel
(:func:`distbn.stats.local_batch_norm`). All paths are tested against ``gluon.nn.BatchNorm``.

Conventions (the book's and MXNet's; PyTorch differs):
  * moving variance is updated with the *biased* batch variance (PyTorch uses the unbiased one);
  * ``moving = momentum * moving + (1 - momentum) * batch`` with momentum 0.9 (PyTorch writes
    the same average with momentum 0.1 on the *new* value);
  * the moving statistics are updated in the forward pass (MXNet's fused operator does it in
    the backward pass), from the global statistics, so they are identical on every worker.

Hybridization: these are imperative ``Block``s (the sync layer communicates between forward
ops), so they cannot sit inside a hybridized ``HybridSequential``. Put them in an
``nn.Sequential`` and call ``hybridize()`` on it: every ``HybridBlock`` neighbour (conv,
dense, pooling, activation) is compiled, the BN layers stay imperative.
"""
from __future__ import annotations

from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from . import native, stats
from .comm import Comm, Group, get_comm


class _ExactStatsGrad(autograd.Function):
    """Identity on ``(x, gamma, beta)`` in forward; fixes the gradient in backward.

    The layer computes ``y = normalize(x, gamma, beta, mean, var)`` with MXNet's fused kernel,
    whose backward holds ``mean`` and ``var`` constant: it yields ``d_part = gamma*invstd*dy``,
    ``dgamma = sum(dy * x_hat)`` and ``dbeta = sum(dy)``. The statistics depend on ``x`` over
    the *global* batch, so the exact input gradient is

        dx = d_part - gamma*invstd * (sum_g(dy) + x_hat * sum_g(dy * x_hat)) / N

    with ``sum_g`` the sums over all workers: this function's backward receives the three
    gradients above, all-reduces (dbeta, dgamma) packed in one (2C,) array, and adds the
    correction in one more pass of the fused kernel.
    """

    def __init__(self, comm: Comm, group: Optional[Group], name: str,
                 mean, var, inv_count, eps: float):
        super().__init__()
        self._comm, self._group, self._name, self._eps = comm, group, name, eps
        self._mean, self._var, self._inv_count = mean, var, inv_count

    def forward(self, x, gamma, beta):
        self._param_shape = gamma.shape
        gamma = gamma.reshape(-1)
        # Save a new array derived from gamma, never gamma's own buffer: keeping a Parameter's
        # data alive in a Function hangs the next Trainer.step (apache/mxnet#15844).
        self.save_for_backward(x, gamma * mx.nd.rsqrt(self._var + self._eps))
        return x.reshape(x.shape), gamma, beta.reshape(-1)

    def backward(self, d_part, dgamma, dbeta):
        x, scale = self.saved_tensors
        sums = self._comm.allreduce_sum(mx.nd.concat(dbeta, dgamma, dim=0),  # sum(dy), sum(dy*x_hat)
                                        name=f"distbn.{self._name}.bwd", group=self._group)
        dx = stats.input_grad(x, d_part, sums, scale, self._inv_count, self._mean, self._var,
                              self._eps)
        # MXNet's backward pass plans memory: once this callback returns, d_part's buffer may
        # be handed to a later node under another engine variable, so no queued op of ours
        # may still read it. dx depends on every read of it.
        dx.wait_to_read()
        # gamma/beta get this worker's share; the distributed trainer sums the shares.
        return dx, dgamma.reshape(self._param_shape), dbeta.reshape(self._param_shape)


def _global_moments(x, comm: Comm, group: Optional[Group], name: str):
    """(mean, var, 1/N) of ``x`` over the global batch of ``group``: (C,), (C,), (1,) float32,
    with one collective."""
    channels = x.shape[1]
    count = x.size // channels
    mean, var = stats.local_moments(x)
    total = comm.allreduce_sum(stats.pack_moments(mean, var, count), name=f"distbn.{name}.fwd",
                               group=group)
    return stats.unpack_moments(total, channels)


def _param_shape(num_features: int, num_dims: Optional[int]) -> tuple:
    if num_dims == 2:
        return (1, num_features)
    if num_dims == 4:
        return (1, num_features, 1, 1)
    if num_dims is None:  # Gluon's layout, used when converting gluon.nn.BatchNorm
        return (num_features,)
    raise ValueError(f"num_dims must be 2 (after a dense layer) or 4 (after a convolution), "
                     f"got {num_dims}")


class BatchNorm(gluon.Block):
    """The book's batch-norm block: ``BatchNorm(num_features, num_dims)``.

    Parameters ``gamma`` (init 1) and ``beta`` (init 0) of shape (1, C) for ``num_dims=2`` and
    (1, C, 1, 1) for ``num_dims=4``; non-trainable parameters ``moving_mean`` (init 0) and
    ``moving_var`` (init 1), saved and loaded with the others. Training mode normalizes with
    the batch statistics and updates the moving ones; prediction mode uses the moving ones.
    """

    def __init__(self, num_features: int, num_dims: Optional[int] = 4, eps: float = 1e-5,
                 momentum: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features, self.num_dims = num_features, num_dims
        self.eps, self.momentum = eps, momentum
        self._local_state = {}
        # Load the C++ operator now, not in the first training step: loading a library makes
        # MXNet rebuild its Python operator wrappers (~0.5 s measured here).
        native.batch_norm_op()
        shape = _param_shape(num_features, num_dims)
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=shape, init=mx.init.One())
            self.beta = self.params.get("beta", shape=shape, init=mx.init.Zero())
            self.moving_mean = self.params.get("moving_mean", shape=shape, init=mx.init.Zero(),
                                               grad_req="null", differentiable=False)
            self.moving_var = self.params.get("moving_var", shape=shape, init=mx.init.One(),
                                              grad_req="null", differentiable=False)

    def _comm_group(self):
        """(communicator, group) for the statistics; None means local statistics."""
        return None, None

    def forward(self, x):
        if x.ndim not in (2, 4) or (self.num_dims is not None and x.ndim != self.num_dims):
            raise ValueError(f"{self.name}: expected {self.num_dims or '2 or 4'}-D input, "
                             f"got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{self.name}: expected {self.num_features} channels on axis 1, "
                             f"got shape {x.shape}")
        ctx = x.context
        gamma, beta = self.gamma.data(ctx), self.beta.data(ctx)
        moving_mean, moving_var = self.moving_mean.data(ctx), self.moving_var.data(ctx)
        if not autograd.is_training():  # prediction: moving statistics, never a collective
            return stats.normalize(x, gamma.reshape(-1), beta.reshape(-1),
                                   moving_mean.reshape(-1), moving_var.reshape(-1), self.eps)
        comm, group = self._comm_group()
        if comm is None or comm.group_size(group) == 1:
            op = native.batch_norm_op() if ctx.device_type == "cpu" and x.dtype == np.float32 else None
            if op is not None:  # one C++ call each way; it updates the moving statistics itself
                return op(x, gamma.reshape(-1), beta.reshape(-1), moving_mean.reshape(-1),
                          moving_var.reshape(-1), eps=self.eps, momentum=self.momentum)[0]
            block, scratch_mean, scratch_var = self._local(ctx, x.ndim)
            y, mean, var = stats.local_batch_norm(block, x, gamma.reshape(-1), beta.reshape(-1),
                                                  scratch_mean, scratch_var)
        else:
            y, mean, var = self._sync_forward(x, gamma, beta, comm, group)
        with autograd.pause():
            stats.blend(moving_mean, mean, self.momentum)
            stats.blend(moving_var, var, self.momentum)
        return y

    def _sync_forward(self, x, gamma, beta, comm, group):
        """Statistics of the global batch (collective 1), gradient through them (collective 2)."""
        with autograd.pause():  # statistics enter the graph as constants; see _ExactStatsGrad
            mean, var, inv_count = _global_moments(x, comm, group, self.name)
        if autograd.is_recording():  # (training mode without recording needs no gradient)
            x, gamma, beta = _ExactStatsGrad(comm, group, self.name, mean, var, inv_count,
                                             self.eps)(x, gamma, beta)
        y = stats.normalize(x, gamma.reshape(-1), beta.reshape(-1), mean, var, self.eps)
        return y, mean, var

    def _local(self, ctx, ndim: int):
        """Per device and input rank: this layer's compiled local batch norm and the buffers
        for the fused kernel's own moving averages (never read)."""
        key = (ctx, ndim)
        if key not in self._local_state:
            c = self.num_features
            self._local_state[key] = (stats.local_batch_norm_block(ndim, self.eps),
                                      mx.nd.zeros(c, ctx=ctx), mx.nd.ones(c, ctx=ctx))
        return self._local_state[key]

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, num_dims={self.num_dims}, "
                f"eps={self.eps}, momentum={self.momentum})")


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose training-mode statistics are those of the global batch.

    The global batch is the union of the batches of all workers (or of ``process_set``, a
    :class:`distbn.comm.Group`). Two collectives per training step, one packed all-reduce in
    forward and one in backward, named after the block, so networks must be built in the same
    order on every rank. Uneven per-worker batches are weighted by their counts (a worker may
    hold a single example). With one worker it does no collective and equals ``BatchNorm``.
    """

    def __init__(self, num_features: int, num_dims: Optional[int] = 4, eps: float = 1e-5,
                 momentum: float = 0.9, process_set: Optional[Group] = None, **kwargs):
        super().__init__(num_features, num_dims, eps, momentum, **kwargs)
        if process_set is not None and not isinstance(process_set, Group):
            raise TypeError("process_set must be a distbn.comm.Group (from get_comm().group(ranks))"
                            f" or None, got {type(process_set).__name__}")
        self.process_set = process_set

    def _comm_group(self):
        return get_comm(), self.process_set
