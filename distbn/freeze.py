"""``freeze_batchnorm`` / ``unfreeze_batchnorm``: batch-norm layers that normalize with their
running statistics in training too (``use_global_stats``), as detectron2's FrozenBatchNorm and
timm's ``freeze_batch_norm_2d`` make them for fine-tuning with small batches.

A frozen layer is MXNet's BatchNorm operator with ``use_global_stats`` (distbn's layers take
that path whatever their kind): its output for an example does not depend on the rest of the
batch, its running statistics do not move, and a synced layer does no collective. Compiled
graphs of the network are dropped, so a hybridized network compiles again at its next call.
"""
from __future__ import annotations

from mxnet import gluon

from .convert import FROZEN as _SAVED, bn_layers, uses_global_stats
from .layers import BatchNorm


def freeze_batchnorm(net: gluon.Block, affine: bool = False) -> gluon.Block:
    """Every batch-norm layer of ``net`` (Gluon's, contrib's, distbn's) uses its running
    statistics in training as well; with ``affine`` gamma and beta stop learning too (their
    ``grad_req`` becomes 'null', as in FrozenBatchNorm). Values are kept. Returns ``net``.
    Freezing a frozen layer changes nothing; :func:`unfreeze_batchnorm` undoes it."""
    for layer in bn_layers(net):
        if not hasattr(layer, _SAVED):
            setattr(layer, _SAVED, (uses_global_stats(layer), layer.gamma.grad_req, layer.beta.grad_req))
        _set_global_stats(layer, True)
        if affine:
            layer.gamma.grad_req = layer.beta.grad_req = "null"
    _recompile(net)
    return net


def unfreeze_batchnorm(net: gluon.Block) -> gluon.Block:
    """The layers frozen by :func:`freeze_batchnorm` as they were before it. Returns ``net``."""
    for layer in bn_layers(net):
        if hasattr(layer, _SAVED):
            global_stats, gamma_req, beta_req = getattr(layer, _SAVED)
            _set_global_stats(layer, global_stats)
            layer.gamma.grad_req, layer.beta.grad_req = gamma_req, beta_req
            delattr(layer, _SAVED)
    _recompile(net)
    return net


def _set_global_stats(layer, value: bool) -> None:
    if isinstance(layer, BatchNorm):
        layer.use_global_stats = value
    else:  # Gluon's and contrib's layers pass their _kwargs to the operator
        layer._kwargs["use_global_stats"] = value


def _recompile(block: gluon.Block) -> None:
    """Drops every compiled graph in ``block``: the layers' settings are read when tracing."""
    if isinstance(block, gluon.HybridBlock):
        block._clear_cached_op()
    for child in block._children.values():
        _recompile(child)
