"""``convert_sync_batchnorm``: swap every BatchNorm of a network for ``SyncBatchNorm``."""
from __future__ import annotations

from typing import Optional

from mxnet import gluon

from .comm import Group
from .layers import BatchNorm, SyncBatchNorm


def _from_gluon(bn: gluon.nn.BatchNorm, process_set) -> SyncBatchNorm:
    kw = bn._kwargs
    channels = bn.gamma.shape[0]
    if kw["axis"] != 1:
        raise ValueError(f"{bn.name}: only channel axis 1 (NCHW / NC) is supported, got {kw['axis']}")
    if not channels:
        raise ValueError(f"{bn.name}: its channel count is not known yet (deferred "
                         "initialization); pass in_channels or run one forward before converting")
    new = SyncBatchNorm(channels, num_dims=None, eps=kw["eps"], momentum=kw["momentum"],
                        process_set=process_set)
    pairs = [(new.gamma, bn.gamma), (new.beta, bn.beta),
             (new.moving_mean, bn.running_mean), (new.moving_var, bn.running_var)]
    return _copy_params(new, pairs)


def _from_distbn(bn: BatchNorm, process_set) -> SyncBatchNorm:
    new = SyncBatchNorm(bn.num_features, num_dims=bn.num_dims, eps=bn.eps, momentum=bn.momentum,
                        process_set=process_set)
    pairs = [(getattr(new, k), getattr(bn, k)) for k in ("gamma", "beta", "moving_mean", "moving_var")]
    return _copy_params(new, pairs)


def _copy_params(new: SyncBatchNorm, pairs) -> SyncBatchNorm:
    for dst, src in pairs:
        dst.grad_req = src.grad_req  # keeps a frozen gamma (scale=False) frozen
        if src._data is None:  # source not initialized: the new layer initializes itself later
            continue
        ctxs = src.list_ctx()
        dst.initialize(ctx=ctxs)
        dst.set_data(src.data(ctxs[0]).reshape(dst.shape))
    return new


def convert_sync_batchnorm(block: gluon.Block, process_set: Optional[Group] = None) -> gluon.Block:
    """Return ``block`` with every ``gluon.nn.BatchNorm`` and ``distbn.BatchNorm`` replaced by
    a ``SyncBatchNorm`` holding the same gamma, beta and moving statistics.

    Replaces children in place (and returns the block, or the new layer when ``block`` itself
    is a BatchNorm). Parameter names change, so create the trainer after converting. A
    ``HybridSequential`` cannot hold the imperative sync layer: convert networks built from
    ``nn.Sequential`` containers (their HybridBlock children may stay hybridized).
    """
    if isinstance(block, SyncBatchNorm):
        return block
    if isinstance(block, BatchNorm):
        return _from_distbn(block, process_set)
    if isinstance(block, gluon.nn.BatchNorm):
        return _from_gluon(block, process_set)
    for key, child in list(block._children.items()):
        new = convert_sync_batchnorm(child, process_set)
        if new is child:
            continue
        if isinstance(block, gluon.HybridBlock):
            raise TypeError(f"{block.name} is a HybridBlock and cannot hold {new.name}, an "
                            "imperative Block: build the network from nn.Sequential containers")
        block._children[key] = new
        for attr, value in list(vars(block).items()):  # attributes that point at the old child
            if value is child:
                object.__setattr__(block, attr, new)
    return block
