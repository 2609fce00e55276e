"""The book's LeNet with batch norm after every conv/dense layer but the last. No rank logic."""
from __future__ import annotations

from mxnet import gluon

from .layers import BatchNorm, SyncBatchNorm

BN_CHOICES = ("sync", "custom", "gluon", "none")


def _bn(kind: str, channels: int, num_dims: int):
    if kind == "gluon":
        return gluon.nn.BatchNorm(in_channels=channels)
    return (SyncBatchNorm if kind == "sync" else BatchNorm)(channels, num_dims)


def lenet(bn: str = "sync") -> gluon.nn.Sequential:
    """LeNet-5 for 1x28x28 input: conv(6,5) BN sigmoid pool, conv(16,5) BN sigmoid pool,
    dense(120) BN sigmoid, dense(84) BN sigmoid, dense(10).

    An ``nn.Sequential`` so that the imperative distbn layers can sit in it; ``hybridize()``
    compiles every other layer. ``bn='none'`` drops the four BN layers.
    """
    if bn not in BN_CHOICES:
        raise ValueError(f"model.bn must be one of {', '.join(BN_CHOICES)}, got {bn!r}")
    net = gluon.nn.Sequential()

    def block(layer, channels, num_dims, pool):
        net.add(layer)
        if bn != "none":
            net.add(_bn(bn, channels, num_dims))
        net.add(gluon.nn.Activation("sigmoid"))
        if pool:
            net.add(gluon.nn.MaxPool2D(pool_size=2, strides=2))

    # Input sizes are spelled out so parameters exist right after initialize(): rank 0 can
    # broadcast them before any forward pass. 16 * 4 * 4: conv2's maps after the second pool.
    block(gluon.nn.Conv2D(6, kernel_size=5, in_channels=1), 6, 4, pool=True)
    block(gluon.nn.Conv2D(16, kernel_size=5, in_channels=6), 16, 4, pool=True)
    block(gluon.nn.Dense(120, in_units=16 * 4 * 4), 120, 2, pool=False)
    block(gluon.nn.Dense(84, in_units=120), 84, 2, pool=False)
    net.add(gluon.nn.Dense(10, in_units=84))
    return net


def bn_layers(net: gluon.Block):
    """The network's batch-norm layers, in order (for TensorBoard histograms)."""
    found = []

    def walk(block):
        if isinstance(block, (BatchNorm, gluon.nn.BatchNorm)):
            found.append(block)
        for child in block._children.values():
            walk(child)
    walk(net)
    return found
