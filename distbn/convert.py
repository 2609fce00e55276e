"""``convert_sync_batchnorm``: swap every batch-norm layer of a network for ``SyncBatchNorm``
(``convert_batchnorm`` for another distbn class); ``revert_sync_batchnorm``: back to Gluon's
``BatchNorm``, for serving. One walk (:func:`swap_batchnorm`) does all three, and the export's
temporary revert (:mod:`distbn.export`)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from mxnet import gluon

from .comm import Group
from .layers import BatchNorm, SyncBatchNorm

FROZEN = "_distbn_unfrozen"  # freeze_batchnorm's record of a layer's settings (distbn.freeze)

# (parent block, child key, the old child, the new one): what a swap did, so it can be undone.
Swap = Tuple[gluon.Block, str, gluon.Block, gluon.Block]


def _settings(bn) -> dict:
    """The constructor arguments that rebuild ``bn`` (Gluon's, contrib's or distbn's)."""
    if isinstance(bn, BatchNorm):
        return dict(num_dims=bn.num_dims, axis=bn.axis, momentum=bn.momentum,
                    epsilon=bn.epsilon, scale=not bn.fix_gamma,
                    use_global_stats=bn.use_global_stats, fuse_relu=bn.fuse_relu)
    kw = bn._kwargs  # contrib's layer has no axis (always 1)
    return dict(axis=kw.get("axis", 1), momentum=kw["momentum"], epsilon=kw["eps"],
                scale=not kw["fix_gamma"], use_global_stats=kw["use_global_stats"],
                fuse_relu=getattr(bn, "fuse_relu", False))


def _replace(bn, cls, extra: dict):
    """A ``cls`` layer (a distbn class, or Gluon's ``BatchNorm``) that shares ``bn``'s
    Parameter objects (values, contexts, gradients, deferred initialization and names all
    carry over; a trainer made before still applies) and its prefix (so its collectives are
    named alike on every rank)."""
    settings = _settings(bn)
    # Gluon shares a Parameter only when the new layer asks for the same grad_req: take the
    # trainable flags from the parameters as they are now (a gamma frozen by the user stays
    # frozen), and whether gamma is read at all from the layer's settings.
    kwargs = dict(prefix=bn.prefix, params=bn.params,
                  beta_initializer=bn.beta.init, gamma_initializer=bn.gamma.init,
                  running_mean_initializer=bn.running_mean.init,
                  running_variance_initializer=bn.running_var.init,
                  **{**settings, **extra, "scale": bn.gamma.grad_req != "null",
                     "center": bn.beta.grad_req != "null"})
    channels = max(bn.gamma.shape[0], 0)  # numpy mode spells an unknown size -1
    if issubclass(cls, BatchNorm):
        new = cls(channels, **kwargs)
        new.fix_gamma = not settings["scale"]
    else:  # Gluon's: no num_dims
        kwargs.pop("num_dims", None)
        fuse_relu = kwargs.pop("fuse_relu")
        new = cls(in_channels=channels, **kwargs)
        new._kwargs["fix_gamma"] = not settings["scale"]
        if fuse_relu:  # BN then ReLU (Gluon's BatchNormReLU runs on oneDNN's layouts only)
            new = _then_relu(new)
    if hasattr(bn, FROZEN):  # unfreeze_batchnorm still knows what the layer was
        setattr(new, FROZEN, getattr(bn, FROZEN))
    if bn._active:  # a layer hybridized on its own stays so
        new.hybridize(True, **dict(bn._flags))
    return new


def _then_relu(bn) -> gluon.nn.HybridSequential:
    both = gluon.nn.HybridSequential(prefix=bn.prefix + "relu_")
    both.add(bn, gluon.nn.Activation("relu"))
    return both


def is_batchnorm(block) -> bool:
    """Gluon's ``BatchNorm`` (contrib's ``SyncBatchNorm`` included) or ``BatchNormReLU``, or a
    distbn layer."""
    return isinstance(block, (BatchNorm, gluon.nn.BatchNorm, gluon.nn.BatchNormReLU))


def bn_layers(net: gluon.Block) -> list:
    """Every batch-norm layer of ``net`` (Gluon's, contrib's ``SyncBatchNorm``, distbn's), in
    the order of its children, each once."""
    found = []

    def walk(block):
        if is_batchnorm(block) and block not in found:
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


def swap_batchnorm(block: gluon.Block, make: Callable, swaps: Optional[List[Swap]] = None):
    """``block`` with every layer ``make`` returns a new layer for replaced in place (children,
    and the attributes that point at them); ``make(layer)`` returns the layer itself to keep
    it. Each replacement is appended to ``swaps`` (see :func:`undo`). Returns ``block``, or
    its replacement when it is a batch-norm layer itself. Compiled graphs are dropped."""
    if is_batchnorm(block):
        return make(block)
    for key, child in list(block._children.items()):
        new = swap_batchnorm(child, make, swaps)
        if new is child:
            continue
        _put(block, key, child, new)
        if swaps is not None:
            swaps.append((block, key, child, new))
    if isinstance(block, gluon.HybridBlock):
        block._clear_cached_op()
    return block


def _put(parent: gluon.Block, key: str, old: gluon.Block, new: gluon.Block) -> None:
    parent._children[key] = new
    for attr, value in list(vars(parent).items()):  # attributes that point at the old child
        if value is old:
            object.__setattr__(parent, attr, new)
    if isinstance(parent, gluon.HybridBlock):
        parent._clear_cached_op()


def undo(swaps: List[Swap]) -> None:
    """Puts back the layers a :func:`swap_batchnorm` replaced, the last replacement first."""
    for parent, key, old, new in reversed(swaps):
        _put(parent, key, new, old)


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
    return swap_batchnorm(block, lambda bn: bn if type(bn) is cls else _replace(bn, cls, extra))


def revert_sync_batchnorm(block: gluon.Block) -> gluon.Block:
    """The converse of :func:`convert_sync_batchnorm`: every distbn batch-norm layer (synced,
    local, frozen, any axis, any devices) and contrib's ``SyncBatchNorm`` becomes
    ``gluon.nn.BatchNorm`` (followed by ``Activation('relu')`` for ``fuse_relu``) in place, with the
    same settings and the same Parameter objects (values, devices, names). What it makes
    runs without distbn (plain MXNet, :func:`distbn.export`). Returns ``block`` (or the new
    layer when ``block`` is a batch-norm layer)."""
    return swap_batchnorm(block, to_gluon)


def to_gluon(bn):
    """``bn`` as Gluon's layer (itself when it is Gluon's already)."""
    if type(bn) is gluon.nn.BatchNorm:
        return bn
    return _replace(bn, gluon.nn.BatchNorm, {})
