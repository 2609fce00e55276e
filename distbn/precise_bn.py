"""``update_bn_stats``: population statistics for evaluation ("precise BN"), over every
worker's data.

The running statistics a network evaluates with are an exponential moving average of batch
statistics taken while the weights moved; at a large learning rate they lag the weights.
This replaces them by statistics of the network as it is. Definition (docs/layer.md):

    run every batch through the network in training mode, weights fixed; for each batch-norm
    layer and batch b take the count n_b, mean m_b and biased variance v_b of the layer's
    input over the batch the layer normalizes with in training (the global batch for a synced
    layer, its group's with a process set, the worker's own for local BN: each device's own
    when a worker drives several); then
        running_mean = sum_b n_b m_b / sum_b n_b,   running_var = sum_b n_b v_b / sum_b n_b
    over every batch of every worker, a synced layer's global batch counted once.

How: a forward pre-hook on each layer records its input's packed statistics
``[n, n m, n (v + m^2)]`` (distbn.stats.local_stats, float64) per batch, the network runs
imperatively (hooks do not fire inside a compiled graph; its compiled graph is kept and used
again afterwards), and one all-gather at the end hands every worker every record. Each
worker then sums each group's records batch by batch (a group's global batch), forms
``n_b v_b = S2 - S1^2 / n_b`` per batch, and sums over batches and groups in float64, in the
same order everywhere: every worker ends with the same bits, local BN included. Workers
agree on how many batches to run, so uneven iterators never leave a synced layer waiting:
with one collective before the pass when every worker's ``batches`` has a ``len()`` (a
list), else with one per batch (a generator: each says whether it has another).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Optional

import numpy as np
from mxnet.util import is_np_array

from . import native, stats
from .comm import get_comm
from .convert import bn_layers, uses_global_stats
from .layers import BatchNorm, SyncBatchNorm

log = logging.getLogger(__name__)


def update_bn_stats(net, batches: Iterable, num_batches: Optional[int] = None) -> int:
    """Re-estimates the running mean and variance of every batch-norm layer of ``net`` (not
    those with ``use_global_stats``: frozen ones keep theirs) from ``batches``, as defined in
    the module docstring; returns the number of batches each worker used.

    Every worker calls it at the same point with its own ``batches``: input arrays, or
    tuples/lists whose first element is the input, on the network's context (a list costs
    one collective fewer per batch than a generator). A network whose parameters live on D
    devices takes batches of D parts, one per device in the parameters' order (each part an
    input or such a tuple, e.g. ``split_and_load``'s list): a synced layer's batch is the union
    of the parts of all devices and workers. ``num_batches`` caps how many each
    worker takes. Workers whose iterators hold different numbers of batches all stop at the
    smallest (a warning names it). Parameters, gradients and the
    network's hybridization are left as they were; the layers' own moving averages during the
    pass leave no trace. One process without Horovod works the same, with no collective.
    """
    import mxnet as mx
    from mxnet import autograd

    comm = get_comm()
    layers = [layer for layer in bn_layers(net) if not uses_global_stats(layer)]
    devices = _device_count(net)
    records = [[] for _ in layers]
    saved = [(layer.running_mean.data().copy(), layer.running_var.data().copy()) for layer in layers]
    # One device: distbn's kernels. Several: MXNet's operators, as the layer's own statistics
    # there (distbn.layers: distbn's kernels share one CPU resource copy across the devices).
    kernels = native.kernels() and devices == 1
    hooks = [layer.register_forward_pre_hook(_recorder(out, _axis(layer), kernels))
             for layer, out in zip(layers, records)]
    used = 0
    try:
        count, uneven = _agree_on_count(comm, _planned(batches, num_batches))
        with _imperative(net), autograd.train_mode():
            it = iter(batches)
            while count is None or used < count:
                batch = next(it, None) if num_batches is None or used < num_batches else None
                if count is None:  # some worker cannot tell its count: agree batch by batch
                    more_everywhere, uneven_now = _agree(comm, batch is not None)
                    uneven = uneven or uneven_now
                    if not more_everywhere:
                        break
                elif batch is None:
                    raise ValueError(f"update_bn_stats: batches held {used} batches, fewer "
                                     f"than its len() said; the other workers are waiting")
                for x in _inputs(batch, devices):  # the devices meet inside the sync layers
                    net(x)
                used += 1
        mx.nd.waitall()
    except BaseException:
        for layer, (mean, var) in zip(layers, saved):
            layer.running_mean.set_data(mean)
            layer.running_var.set_data(var)
        raise
    finally:
        for hook in hooks:
            hook.detach()
    if uneven:
        log.warning("update_bn_stats: the workers held different numbers of batches; "
                    "each used the smallest, %d", used)
    groups = [_group(layer, comm) for layer in layers]
    mine = [(g, _per_batch([r.asnumpy() for r in rec], devices, isinstance(layer, SyncBatchNorm))
             if rec else None) for g, rec, layer in zip(groups, records, layers)]
    everyone = comm.allgather_object(mine)
    array = mx.np.array if is_np_array() else mx.nd.array  # the parameters' kind of array
    for i, layer in enumerate(layers):
        mean, var = population_stats([worker[i] for worker in everyone], layer.name)
        if mean is None:  # the layer saw no example anywhere: it keeps what it had
            mean, var = saved[i][0].asnumpy(), saved[i][1].asnumpy()
        layer.running_mean.set_data(array(mean, dtype=layer.running_mean.dtype))
        layer.running_var.set_data(array(var, dtype=layer.running_var.dtype))
    return used


def _device_count(net) -> int:
    """How many devices the network's parameters live on (each batch then has one part each)."""
    counts = {len(p.list_ctx()) for p in net.collect_params().values() if p._data is not None}
    if len(counts) > 1:
        raise ValueError(f"update_bn_stats: the network's parameters live on different numbers "
                         f"of devices ({sorted(counts)}); initialize them on the same devices")
    return counts.pop() if counts else 1


def _inputs(batch, devices: int) -> list:
    """The network's inputs in one batch: ``[x]`` on one device; on D devices ``batch`` holds
    one part per device, in the parameters' device order (as ``split_and_load`` gives them),
    each an input or a tuple/list whose first element is the input."""
    def first(item):
        return item[0] if isinstance(item, (tuple, list)) else item
    if devices == 1:
        return [first(batch)]
    if not isinstance(batch, (tuple, list)) or len(batch) != devices:
        got = len(batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"update_bn_stats: the network lives on {devices} devices, so each batch "
                         f"is a list of {devices} parts, one per device; got {got}")
    return [first(item) for item in batch]


def _per_batch(records: list, devices: int, synced: bool) -> np.ndarray:
    """(batches, 1 + 2C) records of this worker from one record per batch and device, in
    device order: a synced layer normalizes with its devices' union (their sum); any other
    normalizes each device's part apart (a batch of its own)."""
    rec = np.stack(records)
    if devices == 1 or not synced:
        return rec
    return rec.reshape(-1, devices, rec.shape[1]).sum(axis=1)


def population_stats(per_worker: list, name: str = "layer"):
    """(mean, var) float64 of one layer from every worker's ``(group ranks, records)``, in
    rank order: ``records`` (batches, 1 + 2C) of packed statistics of this worker's input, or
    None where the layer saw no batch. (None, None) when no example was seen.

    A group's global batch b is the sum of its members' records b; each group counted once."""
    seen = {}
    for rank, (group, rec) in enumerate(per_worker):
        if rank not in group:
            raise RuntimeError(f"{name}: rank {rank} reported the group {group}")
        seen.setdefault(group, []).append(rec)
    s0 = s1 = s2 = 0.0
    for group, recs in seen.items():
        if len(recs) != len(group):
            raise RuntimeError(f"{name}: the group {group} was reported by {len(recs)} workers")
        if any(r is None for r in recs):
            continue
        total = np.sum(recs, axis=0)                         # (batches, 1 + 2C): global batches
        n = total[:, :1]
        c = (total.shape[1] - 1) // 2
        sum1, sum2 = total[:, 1:1 + c], total[:, 1 + c:]
        keep = n[:, 0] > 0
        s0 = s0 + n[keep].sum()
        s1 = s1 + sum1[keep].sum(axis=0)
        s2 = s2 + (sum2[keep] - sum1[keep] ** 2 / n[keep]).sum(axis=0)   # sum_b n_b v_b
    if not np.any(s0):
        return None, None
    return s1 / s0, np.maximum(s2 / s0, 0.0)


def _group(layer, comm) -> tuple:
    """The ranks whose batches make the batch ``layer`` normalizes with in training."""
    if isinstance(layer, SyncBatchNorm):
        if layer.process_set is not None:
            return tuple(layer.process_set.ranks)
        return tuple(range(comm.size))
    return (comm.rank,)  # this worker's statistics (Gluon's, contrib's: one device a worker)


def _axis(layer) -> int:
    return layer.axis if isinstance(layer, BatchNorm) else layer._kwargs["axis"]


def _recorder(out: list, axis: int, kernels: bool):
    """A forward pre-hook appending the packed statistics of the layer's input to ``out``."""
    import mxnet as mx

    def hook(block, inputs):
        x = inputs[0]
        if is_np_array():
            x = x.as_nd_ndarray()  # the same memory, seen as a legacy NDArray
        if x.dtype not in (np.float32, np.float64):
            x = mx.nd.amp_cast(x, dtype="float32")  # float16, bfloat16: the layer's own math
        out.append(stats.local_stats(mx.nd, stats.channels_in_middle(mx.nd, x, axis), kernels))
    return hook


def _planned(batches, num_batches: Optional[int]) -> Optional[int]:
    """How many batches this worker will run, when it can tell without iterating."""
    try:
        n = len(batches)
    except TypeError:
        return num_batches if num_batches == 0 else None
    return n if num_batches is None else min(n, num_batches)


def _agree_on_count(comm, planned: Optional[int]):
    """(the smallest count, or None when some worker cannot tell its own; whether the counts
    differ): one collective, so that a list of batches costs none per batch."""
    import mxnet as mx
    known = planned is not None
    flags = mx.nd.array([0.0 if known else 1.0, planned if known else 0.0,
                         -planned if known else float("-inf")], dtype="float64")
    unknown, most, least = comm.allreduce_max(flags, name="distbn.precise_bn.count").asnumpy()
    if unknown:
        return None, False
    return int(-least), bool(most != -least)


def _agree(comm, have_batch: bool):
    """(whether every worker has a batch, whether some have and some not): one collective."""
    import mxnet as mx
    flags = mx.nd.array([0.0 if have_batch else 1.0, 1.0 if have_batch else 0.0], dtype="float64")
    lacking, having = comm.allreduce_max(flags, name="distbn.precise_bn.more").asnumpy()
    return not lacking, bool(lacking and having)


@contextmanager
def _imperative(net):
    """``net`` and every block in it run imperatively inside; their compiled graphs are kept,
    and used again after."""
    from mxnet import gluon
    blocks = []

    def walk(block):
        if isinstance(block, gluon.HybridBlock):
            blocks.append((block, block._active))
            block._active = False
        for child in block._children.values():
            walk(child)
    walk(net)
    try:
        yield
    finally:
        for block, active in blocks:
            block._active = active
