"""``convert_sync_batchnorm``: swap every batch-norm layer of a network for ``SyncBatchNorm``
(``convert_batchnorm`` for another distbn class)."""
from __future__ import annotations

from typing import Optional

from mxnet import gluon

from .comm import Group
from .layers import BatchNorm, SyncBatchNorm


def _settings(bn) -> dict:
    """The constructor arguments that rebuild ``bn`` (Gluon's, contrib's or distbn's)."""
    if isinstance(bn, BatchNorm):
        return dict(num_dims=bn.num_dims, axis=bn.axis, momentum=bn.momentum,
                    epsilon=bn.epsilon, scale=not bn.fix_gamma,
                    use_global_stats=bn.use_global_stats, fuse_relu=bn.fuse_relu)
    kw = bn._kwargs
    return dict(axis=kw["axis"], momentum=kw["momentum"], epsilon=kw["eps"], scale=not kw["fix_gamma"],
                use_global_stats=kw["use_global_stats"], fuse_relu=getattr(bn, "fuse_relu", False))


def _replace(bn, cls, extra: dict) -> BatchNorm:
    """A ``cls`` layer that shares ``bn``'s Parameter objects (values, contexts, gradients,
    deferred initialization and names all carry over; a trainer made before still applies)
    and its prefix (so its collectives are named alike on every rank)."""
    settings = _settings(bn)
    # Gluon shares a Parameter only when the new layer asks for the same grad_req: take the
    # trainable flags from the parameters as they are now (a gamma frozen by the user stays
    # frozen), and whether gamma is read at all from the layer's settings.
    channels = max(bn.gamma.shape[0], 0)  # numpy mode spells an unknown size -1
    new = cls(channels, prefix=bn.prefix, params=bn.params,
              beta_initializer=bn.beta.init, gamma_initializer=bn.gamma.init,
              running_mean_initializer=bn.running_mean.init,
              running_variance_initializer=bn.running_var.init,
              **{**settings, **extra, "scale": bn.gamma.grad_req != "null",
                 "center": bn.beta.grad_req != "null"})
    new.fix_gamma = not settings["scale"]
    if bn._active:  # a layer hybridized on its own stays so
        new.hybridize(True, **dict(bn._flags))
    return new


def bn_layers(net: gluon.Block) -> list:
    """Every batch-norm layer of ``net`` (Gluon's, contrib's ``SyncBatchNorm``, distbn's), in
    the order of its children, each once."""
    found = []

    def walk(block):
        if isinstance(block, (BatchNorm, gluon.nn.BatchNorm)) and block not in found:
            found.append(block)
        for child in block._children.values():
            walk(child)
    walk(net)
    return found


def uses_global_stats(layer) -> bool:
    """Whether a batch-norm layer normalizes with its running statistics in training too."""
    if isinstance(layer, BatchNorm):
        return bool(layer.use_global_stats)
    return bool(layer._kwargs["use_global_stats"])  # Gluon's and contrib's: the operator's


def convert_sync_batchnorm(block: gluon.Block, process_set: Optional[Group] = None) -> gluon.Block:
    """Return ``block`` with every ``gluon.nn.BatchNorm`` (contrib's ``SyncBatchNorm``
    included) and ``distbn.BatchNorm`` replaced by a ``SyncBatchNorm`` over all workers (or
    ``process_set``).

    Works on any Gluon network (``HybridBlock`` or ``Block`` containers, before or after
    initialization, hybridized or not): the new layers share the old ones' Parameter
    objects, so every value, name and gradient buffer stays, and a trainer made before still
    applies. Children are replaced in place; the block is returned (or the new layer when
    ``block`` itself is a batch-norm layer). Compiled graphs are dropped, so the next call
    (or ``hybridize()``) compiles the network with the new layers.
    """
    return convert_batchnorm(block, SyncBatchNorm, process_set=process_set)


def convert_batchnorm(block: gluon.Block, cls=BatchNorm, **extra) -> gluon.Block:
    """Like :func:`convert_sync_batchnorm`, to ``cls`` (a distbn class) built with ``extra``."""
    if isinstance(block, (gluon.nn.BatchNorm, BatchNorm)) and type(block) is not cls:
        return _replace(block, cls, extra)
    for key, child in list(block._children.items()):
        new = convert_batchnorm(child, cls, **extra)
        if new is child:
            continue
        block._children[key] = new
        for attr, value in list(vars(block).items()):  # attributes that point at the old child
            if value is child:
                object.__setattr__(block, attr, new)
    if isinstance(block, gluon.HybridBlock):
        block._clear_cached_op()
    return block
