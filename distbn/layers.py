"""Gluon blocks: ``BatchNorm`` (statistics of this worker's batch) and ``SyncBatchNorm``
(statistics of the global batch), drop-in ``HybridBlock``s for ``gluon.nn.BatchNorm`` and
``mx.gluon.contrib.nn.SyncBatchNorm``.

Statistics of one worker's batch (``BatchNorm``; ``SyncBatchNorm`` in a group of one worker;
``use_global_stats=True``) are MXNet's own fused BatchNorm operator, as in Gluon: same values,
same speed (on the CPU it works in oneDNN's blocked layout, which distbn's operators cannot
read; on GPUs it is cuDNN's). Statistics of several workers' batches are one graph, run
imperatively or compiled with the rest of a hybridized network:

    probe = mode_probe(...)                  training or prediction, decided when it runs
    L = local_stats(x)                       (1 + 2C,) float64          [distbn.stats]
    G = allreduce(L)                         one collective forward, one backward [engine: Gloo]
    y = normalize(x, G, probe, gamma, beta, running_mean, running_var)      [distbn.stats]

so a sync layer does one collective in forward and, through the all-reduce's gradient, one in
backward per training step; none in prediction, none with one worker.

Parameters are Gluon's (``gamma``, ``beta``, ``running_mean``, ``running_var``, shape (C,),
channels taken from the first input when ``in_channels=0``), so a parameter file of a network
built with ``gluon.nn.BatchNorm`` loads into the same network built with these, and back.

Types: float32 data with float32 parameters; float64 with float64 (``net.cast('float64')``);
float16 and bfloat16 data (``net.cast('float16')``, MXNet's AMP) with float32 parameters, as in
MXNet's BatchNorm, computed in float32; statistics summed in float64 in every case; output and
input gradient in the data's type.

Conventions (MXNet's and the book's; PyTorch differs):
  * the running variance is updated with the *biased* batch variance;
  * ``running = momentum * running + (1 - momentum) * batch`` with momentum 0.9;
  * synced statistics update the running ones in the forward pass, from the global
    statistics, so they are identical on every worker; MXNet's operator (one worker's
    statistics) does it in the backward pass. After a training step they agree.
"""
from __future__ import annotations

import os
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.util import is_np_array
from mxnet.contrib.amp.amp import bfloat16  # numpy has none: AMP's structured dtype

from . import gpu, hardware, native, stats
from .comm import Group, get_comm
from .engine import allreduce_op


class BatchNorm(gluon.HybridBlock):
    """Batch norm over this worker's batch (MXNet's BatchNorm operator, as Gluon's layer);
    Gluon's arguments, or the book's ``BatchNorm(num_features, num_dims)``. Input (N, C, ...),
    output of the same shape and type; parameters ``gamma``, ``beta``, ``running_mean``,
    ``running_var`` of shape (C,).

    ``in_channels`` (the book's ``num_features``; 0: from the first input) comes first, then
    ``num_dims`` (optional: 2 after a dense layer, 4 after a convolution; checked on
    imperative calls). The rest are ``gluon.nn.BatchNorm``'s keywords; ``axis`` (default 1,
    channels first) may be any axis of the input, negative ones counted from the end (-1:
    channels last, NHWC). Legacy NDArrays and, under ``npx.set_np()``, ``mx.np`` arrays, there
    also an empty batch (PyTorch's rules: see :meth:`_empty`).
    """

    def __init__(self, in_channels: int = 0, num_dims: Optional[int] = None, *, axis: int = 1,
                 momentum: float = 0.9, epsilon: float = 1e-5, center: bool = True,
                 scale: bool = True, use_global_stats: bool = False, fuse_relu: bool = False,
                 beta_initializer="zeros", gamma_initializer="ones",
                 running_mean_initializer="zeros", running_variance_initializer="ones",
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.axis = axis
        if num_dims not in (None, 2, 4):
            raise ValueError(f"num_dims must be 2 (after a dense layer), 4 (after a convolution) "
                             f"or None, got {num_dims}")
        if in_channels < 0:
            raise ValueError(f"in_channels must be positive (or 0: from the first input), "
                             f"got {in_channels}")
        self.num_dims = num_dims
        self.momentum, self.epsilon, self.fuse_relu = float(momentum), float(epsilon), fuse_relu
        self.fix_gamma, self.use_global_stats = not scale, use_global_stats
        # Build or load the C++ operators now, not in the first step: loading a library makes
        # MXNet rebuild its operator wrappers (~0.5 s measured here). Whether the layer syncs
        # (and so uses them) is known only when its graph is traced.
        self._native = native.kernels()
        self._data_dtype = "float32"
        self._checked_devices = None  # the parameters' devices, once distbn.gpu passed them
        shape = (in_channels,)

        def param(name, init, trainable):
            return self.params.get(name, grad_req="write" if trainable else "null", shape=shape,
                                   init=init, allow_deferred_init=True, differentiable=trainable)
        self.gamma = param("gamma", gamma_initializer, scale)
        self.beta = param("beta", beta_initializer, center)
        self.running_mean = param("running_mean", running_mean_initializer, False)
        self.running_var = param("running_var", running_variance_initializer, False)

    def cast(self, dtype):
        self._data_dtype = np.dtype(dtype).name  # the data's type (float16: see _narrowed)
        if self._data_dtype == "float16":  # as Gluon's BatchNorm: parameters stay float32
            dtype = "float32"
        super().cast(dtype)

    def _allreduce_key(self) -> Optional[tuple]:
        """(collective key, ranks, devices) when the statistics are summed over workers or
        devices, else None (this device's statistics: MXNet's operator)."""
        return None

    def forward(self, x, *args):
        """Gluon's, except that a hybridized layer given an empty batch runs it imperatively:
        a compiled graph cannot tell the batch is empty, and its reshapes divide by 0."""
        self._check_devices()
        if self._active and _is_empty(x):
            params = {k: v.data(x.context) for k, v in self._reg_params.items()}
            return self.hybrid_forward(mx.nd, x, *args, **params)
        return super().forward(x, *args)

    def _devices(self) -> tuple:
        """The parameters' devices (where the layer runs); none before initialization (a
        graph composed for export)."""
        try:
            return tuple(self.gamma.list_ctx())
        except RuntimeError:
            return ()

    def _check_devices(self) -> None:
        """A GPU that MXNet's CUDA wheel has no code for stops here, before its first kernel
        (:mod:`distbn.gpu`). The parameters' devices are where the layer runs (deferred ones
        too: before anything is allocated there); asked again only when they change, so an
        imperative call costs a list comparison."""
        devices = self._devices()
        if devices != self._checked_devices:
            for ctx in devices:
                gpu.check(ctx)
            self._checked_devices = devices

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if is_np_array():
            # Numpy mode (``npx.set_np()``): the same graph, on legacy views of the arrays or
            # symbols. ``as_nd_ndarray`` and ``as_np_ndarray`` are shallow copies (the same
            # memory, no operator in a graph, recorded by autograd), so the running statistics
            # stay the variables their operators update in place.
            args = (a.as_nd_ndarray() for a in (x, gamma, beta, running_mean, running_var))
            return self._forward(F, *args).as_np_ndarray()
        return self._forward(F, x, gamma, beta, running_mean, running_var)

    def _forward(self, F, x, gamma, beta, running_mean, running_var):
        if hasattr(x, "ndim"):  # imperative call: check what a graph would reject less clearly
            self._check_input(x, gamma)
        sync = None if self.use_global_stats else self._allreduce_key()
        # An empty batch (numpy mode) takes the synced graph, with or without the exchange:
        # MXNet's operator would fill the running statistics and gamma's gradient with NaN.
        if sync is None and not (_is_empty(x) and not self.use_global_stats):  # this worker's statistics (or frozen): MXNet's operator
            y = F.BatchNorm(x, gamma, beta, running_mean, running_var, eps=self.epsilon,
                            momentum=self.momentum, fix_gamma=self.fix_gamma,
                            use_global_stats=self.use_global_stats, axis=self.axis)
        else:
            y = self._synced(F, x, gamma, beta, running_mean, running_var, sync)
        return F.relu(y) if self.fuse_relu else y

    def _check_input(self, x, gamma):
        if self.num_dims is not None and x.ndim != self.num_dims:
            raise ValueError(f"{self.name}: expected {self.num_dims}-D input, got shape {x.shape}")
        if not -x.ndim <= self.axis < x.ndim or x.ndim < 2:
            raise ValueError(f"{self.name}: channel axis {self.axis} does not exist in input of "
                             f"shape {x.shape}")
        if 0 in x.shape and not self._native:
            raise ValueError(f"{self.name}: empty input of shape {x.shape}: the MXNet-operator "
                             f"graph (GPUs, DISTBN_NATIVE=0) takes no empty batch; distbn's C++ "
                             f"operators (the CPU) do")
        if x.shape[self.axis] != gamma.shape[0]:
            raise ValueError(f"{self.name}: expected {gamma.shape[0]} channels on axis "
                             f"{self.axis}, got shape {x.shape}")
        if _is_bfloat16(x) and hardware.bfloat16_unsupported():
            raise TypeError(f"{self.name}: bfloat16 data cannot run here: "
                            f"{hardware.bfloat16_unsupported()}; use float32")

    def _synced(self, F, x, gamma, beta, running_mean, running_var, sync):
        # (A, C, B): one view of x for every operator below, whatever the channel axis
        # (stats.channels_in_middle). MXNet reorders a convolution's output from oneDNN's
        # blocked layout for each operator that reads it (~0.5 ms each at ResNet-18's
        # 64x64x14x14 here); the reshape does it once.
        dtype = np.dtype(self.running_mean.dtype).name  # the parameters' (Block.cast)
        native = self._native and not (sync and sync[2])  # several devices: see below
        cast = not native or _is_bfloat16(x)
        if _is_empty(x):
            if not native:
                raise ValueError(f"{self.name}: empty input of shape {x.shape}: a layer on "
                                 f"several devices, or the MXNet-operator graph, takes none")
            return self._empty(F, x, gamma, beta, running_mean, running_var, sync, dtype)
        x3 = stats.channels_in_middle(F, self._widened(F, x, dtype) if cast else x, self.axis)
        local = stats.local_stats(F, x3, native)
        y3 = self._exchange_and_normalize(F, x3, local, gamma, beta, running_mean, running_var,
                                          sync, dtype, native)
        y = F.reshape_like(y3, x)
        return self._narrowed(F, y, x, dtype) if cast else y

    # Several devices of one process take the MXNet-operator statistics (the GPUs' graph) on
    # the CPU too: MXNet gives every library operator (distbn's C++ kernels) a parallel-random
    # resource, of which all CPU devices share one copy (MXNET_CPU_PARALLEL_RAND_COPY=1), so a
    # device's kernel queued after its exchange would hold back the other device's kernel
    # before its exchange, which the first waits for: seen to hang on the first step.

    def _exchange_and_normalize(self, F, x3, local, gamma, beta, running_mean, running_var,
                                sync, dtype, native=None):
        native = self._native if native is None else native
        probe = stats.mode_probe(F, local, running_mean, running_var, dtype)
        total = allreduce_op(F, local, probe, *sync) if sync else local  # None: this worker's
        return stats.normalize(F, x3, total, probe, gamma, beta, running_mean, running_var,
                               eps=self.epsilon, momentum=self.momentum, fix_gamma=self.fix_gamma,
                               native=native, dtype=dtype)

    def _empty(self, F, x, gamma, beta, running_mean, running_var, sync, dtype):
        """A worker's empty batch (numpy mode; imperative): no example, but the same exchanges
        and running-statistics update as every other worker's (PyTorch's rules, pytorch#36530).
        Its statistics add zeros; the normalization runs on one stand-in example of zeros,
        whose output reaches the empty output times 0, so that backward sends the exchange
        zeros and the parameters get zero gradients. The empty array itself goes through no
        reshape and no distbn operator: MXNet's backward fails on either at size 0."""
        channels = x.shape[self.axis]
        # Zeros that depend on x as the statistics do, so that backward reaches the exchange
        # exactly when it does on the other workers (MXNet skips it when nothing upstream
        # needs a gradient).
        local = F.broadcast_add(F.zeros((1 + 2 * channels,), dtype="float64"),
                                F.cast(F.sum(x), "float64") * 0)
        stand_in = F.zeros((1, channels, 1), dtype=dtype if dtype == "float64" else "float32")
        done = self._exchange_and_normalize(F, stand_in, local, gamma, beta, running_mean,
                                            running_var, sync, dtype)
        return F.broadcast_add(x, (F.sum(done) * 0).astype(x.dtype).reshape((1,) * x.ndim))

    # Half-precision data (float16 after ``net.cast('float16')``, bfloat16 or float16 inside
    # a network under MXNet's AMP) meet float32 parameters, as in MXNet's BatchNorm. distbn's
    # C++ operators read and write float16 themselves (no cast on the CPU's path); the
    # MXNet-operator graph (GPUs, DISTBN_NATIVE=0) and bfloat16 NDArrays (MXNet's extension
    # API cannot hand bfloat16 to an operator) run in float32 between two casts, whose
    # gradients come back in the input's type. Inside a graph under AMP, bfloat16 never
    # reaches the layer's operators: AMP runs reshape, the layer's first, in float32. float64
    # data meet float64 parameters (``net.cast('float64')``) and need neither.

    @staticmethod
    def _widened(F, x, dtype):
        # amp_cast widens float16/bfloat16 and leaves float32 alone (and float64, which
        # would then fail MXNet's type check, naming the parameters).
        return x if dtype == "float64" else F.amp_cast(x, dtype="float32")

    def _narrowed(self, F, y, x, dtype):
        """``y`` (float32 or float64) in ``x``'s type."""
        if dtype == "float64":
            return y
        if self._data_dtype == "float16" or getattr(x, "dtype", None) == np.float16:
            return F.amp_cast(y, dtype="float16")  # oneDNN's amp_multicast rejects float16
        if getattr(x, "dtype", None) == np.float32:
            return y
        # The type is known only when the graph runs: float32, bfloat16 or float16 (AMP).
        return F.amp_multicast(y, F.BlockGrad(x), num_outputs=2, cast_narrow=True)[0]

    def __repr__(self):
        channels = self.gamma.shape[0] or None
        return (f"{type(self).__name__}(in_channels={channels}, axis={self.axis}, "
                f"momentum={self.momentum}, "
                f"epsilon={self.epsilon}, fix_gamma={self.fix_gamma}, "
                f"use_global_stats={self.use_global_stats})")


def _is_empty(x) -> bool:
    """Whether ``x`` is an array with no element (numpy mode; a symbol's shape is not known)."""
    return hasattr(x, "shape") and 0 in x.shape


def _is_bfloat16(x) -> bool:
    """Whether ``x`` is a bfloat16 NDArray (a symbol's type is not known)."""
    return getattr(x, "dtype", None) == bfloat16


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose training-mode statistics are those of the global batch: every
    device of every worker (of ``process_set``).

    Arguments: those of :class:`BatchNorm` (``in_channels``, ``num_dims``, Gluon's keywords),
    plus ``num_devices`` (contrib's: the devices of each process, checked against the
    parameters' contexts when given), ``key`` (the collectives' name; default: the block's
    prefix) and ``process_set`` (a :class:`distbn.comm.Group`; default: all workers).
    Input (N, C, ...) of float32, float64, float16 (bfloat16 under MXNet's AMP); output of the
    same shape and type. What runs: with one worker and one device MXNet's BatchNorm operator;
    with several workers, on the CPU distbn's C++ operators and the Gloo all-reduce
    (:mod:`distbn.engine`), on GPUs MXNet's operators and the same all-reduce through host
    memory (never executed); with several devices per process, MXNet's operators and the
    devices' exchange (docs/layer.md, "Several devices per process").

    The global batch is the union of the batches of all devices of all workers (or of
    ``process_set``). Several devices of one process (parameters initialized on
    ``[mx.cpu(0), mx.cpu(1)]`` or several GPUs, as with contrib's layer and the book's
    multi-GPU loop) meet inside the exchange, which then runs one cross-process all-reduce of
    their sum (:mod:`distbn.engine`). One packed all-reduce in forward and one in backward per
    training step, named after ``key`` (default: the block's prefix), so networks must be
    built in the same order on every rank. Uneven per-worker and per-device batches are
    weighted by their counts (one may hold a single example). With one worker and one device it
    does no collective and equals ``BatchNorm``. ``mx.gluon.contrib.nn.SyncBatchNorm(...,
    num_devices=N)`` becomes this class by a one-word change.
    """

    def __init__(self, in_channels: int = 0, num_dims: Optional[int] = None, *,
                 num_devices: Optional[int] = None, key: Optional[str] = None,
                 process_set: Optional[Group] = None, **kwargs):
        super().__init__(in_channels, num_dims, **kwargs)
        if process_set is not None and not isinstance(process_set, Group):
            raise TypeError("process_set must be a distbn.comm.Group (from get_comm().group(ranks))"
                            f" or None, got {type(process_set).__name__}")
        if num_devices is not None and (not isinstance(num_devices, int) or num_devices < 1):
            raise ValueError(f"num_devices must be a positive int or None, got {num_devices!r}")
        self.num_devices = num_devices
        self.process_set = process_set
        self.key = key or self.prefix

    def _allreduce_key(self):
        comm = get_comm()
        size = comm.group_size(self.process_set)
        devices = self._devices()
        if self.num_devices is not None and devices and self.num_devices != len(devices):
            raise ValueError(f"{self.name}: num_devices={self.num_devices}, but the parameters "
                             f"live on {len(devices)} device(s) {list(map(str, devices))}: "
                             f"initialize on as many devices, or leave num_devices out")
        if size == 1 and len(devices) <= 1:
            return None
        if not native.available():
            raise RuntimeError(f"{self.name}: syncing statistics over {size} workers and "
                               f"{len(devices)} device(s) needs distbn's C++ library (a C++ "
                               "compiler and Gloo: see the warning above, and launch/install.sh)")
        if size > 1 and not comm.engine:
            raise RuntimeError(f"{self.name}: the sync layers' engine is not up (see above)")
        if len(devices) > 1 and os.environ.get("MXNET_ENGINE_TYPE") == "NaiveEngine":
            raise RuntimeError(f"{self.name}: several devices ({len(devices)}) need MXNet's "
                               "threaded engine, which runs them side by side; MXNET_ENGINE_TYPE="
                               "NaiveEngine runs one operator at a time and the devices' "
                               "exchange would wait for ever: unset it")
        ranks = self.process_set.ranks if size < comm.size else ()  # () = all workers
        return self.key, ranks, devices if len(devices) > 1 else ()
