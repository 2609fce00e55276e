"""The trainer's networks: the book's LeNet, or any Gluon model-zoo vision network, for 1x28x28
input and 10 classes, with every batch-norm layer of the kind asked for. No rank logic."""
from __future__ import annotations

from mxnet import gluon
from mxnet.gluon.model_zoo import vision

from .convert import convert_batchnorm
from .layers import BatchNorm, SyncBatchNorm

BN_CHOICES = ("sync", "custom", "gluon", "none")
_BN_CLASSES = {"sync": SyncBatchNorm, "custom": BatchNorm}


def known_arch(arch: str) -> bool:
    """``lenet``, or a name ``mxnet.gluon.model_zoo.vision.get_model`` knows (it keeps its
    list to itself: building the network, shapes deferred, is how to ask)."""
    if arch == "lenet":
        return True
    try:
        vision.get_model(arch, classes=10)
    except ValueError:
        return False
    return True


def build(arch: str = "lenet", bn: str = "sync", process_set=None) -> gluon.HybridBlock:
    """``arch`` with batch norm ``bn``: ``sync`` (distbn.SyncBatchNorm over all workers, or
    over ``process_set``), ``custom`` (distbn.BatchNorm, this worker's statistics), ``gluon``
    (gluon.nn.BatchNorm) or ``none`` (LeNet only: no batch norm)."""
    if bn not in BN_CHOICES:
        raise ValueError(f"model.bn must be one of {', '.join(BN_CHOICES)}, got {bn!r}")
    if arch == "lenet":
        return lenet(bn, process_set)
    if bn == "none":
        raise ValueError("model.bn=none is for lenet only: model-zoo networks keep their BN layers")
    try:
        net = vision.get_model(arch, classes=10)
    except ValueError:
        raise ValueError(f"model.arch must be lenet or a model-zoo vision name (e.g. "
                         f"resnet18_v1), got {arch!r}") from None
    extra = {"process_set": process_set} if bn == "sync" else {}
    return net if bn == "gluon" else convert_batchnorm(net, _BN_CLASSES[bn], **extra)


def finish_shapes(net: gluon.HybridBlock, x) -> None:
    """Initialize parameters whose shapes wait for the first input (model-zoo networks), by
    shape inference on ``x`` rather than a pass: a prediction pass leaves oneDNN's blocked
    layout in convolution weights, which Horovod's broadcast cannot read, and a training pass
    would move the running statistics. ``net`` must be initialized already."""
    net.infer_shape(x)
    for p in net.collect_params().values():
        p._finish_deferred_init()


def lenet(bn: str = "sync", process_set=None) -> gluon.nn.HybridSequential:
    """LeNet-5 for 1x28x28 input: conv(6,5) BN sigmoid pool, conv(16,5) BN sigmoid pool,
    dense(120) BN sigmoid, dense(84) BN sigmoid, dense(10). ``bn='none'`` drops the four BN
    layers; sync layers sync over ``process_set`` (None: all workers)."""
    net = gluon.nn.HybridSequential()

    def block(layer, channels, num_dims, pool):
        net.add(layer)
        if bn == "gluon":
            net.add(gluon.nn.BatchNorm(in_channels=channels))
        elif bn == "sync":
            net.add(SyncBatchNorm(channels, num_dims, process_set=process_set))
        elif bn != "none":
            net.add(_BN_CLASSES[bn](channels, num_dims))
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

