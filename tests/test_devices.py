"""Several devices in one process (mx.cpu(0), mx.cpu(1)): what the layer refuses, and how a
devices' exchange that cannot meet ends. The equality proofs are in test_syncbn_mp.py."""
import time

import mxnet as mx
import pytest
from mxnet import autograd

import distbn
from distbn import engine

DEVICES = [mx.cpu(0), mx.cpu(1)]


def test_num_devices_must_agree_with_the_parameters_devices():
    with pytest.raises(ValueError, match="num_devices must be a positive int"):
        distbn.SyncBatchNorm(3, num_devices=0)
    layer = distbn.SyncBatchNorm(3, num_devices=2)
    layer.initialize(ctx=mx.cpu(0))
    with pytest.raises(ValueError, match=r"syncbatchnorm\d+: num_devices=2, but the parameters "
                                         r"live on 1 device\(s\)"):
        with autograd.record():
            layer(mx.nd.ones((2, 3)))


def test_naive_engine_is_refused_with_several_devices(monkeypatch):
    monkeypatch.setenv("MXNET_ENGINE_TYPE", "NaiveEngine")
    layer = distbn.SyncBatchNorm(3)
    layer.initialize(ctx=DEVICES)
    with pytest.raises(RuntimeError, match="NaiveEngine runs one operator at a time"):
        with autograd.record():
            layer(mx.nd.ones((2, 3), ctx=DEVICES[0]))


def test_a_device_that_never_runs_the_layer_ends_with_an_error_naming_it(monkeypatch):
    """The step's batch reaches device 0 only: its exchange waits DISTBN_DEVICE_TIMEOUT for
    device 1, then fails; the error names the layer and the missing device."""
    monkeypatch.setenv("DISTBN_DEVICE_TIMEOUT", "2")
    layer = distbn.SyncBatchNorm(3)
    layer.initialize(ctx=DEVICES)
    t = time.time()
    with pytest.raises(mx.base.MXNetError) as e:
        with autograd.record():
            y = layer(mx.nd.ones((2, 3), ctx=DEVICES[0]))
        y.asnumpy()
    assert time.time() - t < 30
    message = engine.failure(e.value)
    assert message and f"distbn.{layer.prefix}fwd" in message and "waited 2 s for device(s) 1" in message


def test_prediction_on_several_devices_needs_no_meeting():
    """Outside training each device normalizes with the running statistics alone: a device may
    predict on its own."""
    layer = distbn.SyncBatchNorm(3)
    layer.initialize(ctx=DEVICES)
    y = layer(mx.nd.ones((2, 3), ctx=DEVICES[1]) * 2)
    assert abs(y.asnumpy() - 2 / (1 + 1e-5) ** 0.5).max() < 1e-5


def test_update_bn_stats_takes_one_part_per_device():
    """A network on two devices re-estimates from batches of two parts (one per device): a
    batch of one array is refused before anything runs, naming what it takes."""
    layer = distbn.SyncBatchNorm(3)
    layer.initialize(ctx=DEVICES)
    with pytest.raises(ValueError, match="the network lives on 2 devices, so each batch is a "
                                         "list of 2 parts, one per device; got NDArray"):
        distbn.update_bn_stats(layer, [mx.nd.ones((2, 3), ctx=DEVICES[0])])


EPS = 1e-5


@pytest.mark.parametrize("how", ["direct", "converted"])
def test_ones_on_one_device_and_threes_on_the_other_give_minus_and_plus_one(how):
    """The case of the issue: one channel, a batch of ones on device 0 and of threes on device
    1. The global statistics (mean 2, variance 1) give -1 and +1 and the same running mean on
    both devices; each device's own statistics would give 0 and 0. ``converted``: Gluon's BN
    initialized on both devices, then convert_sync_batchnorm (sharing its parameters)."""
    if how == "direct":
        net = distbn.SyncBatchNorm(in_channels=1, num_devices=2)
        net.initialize(ctx=DEVICES)
    else:
        net = mx.gluon.nn.HybridSequential()
        net.add(mx.gluon.nn.BatchNorm(in_channels=1))
        net.initialize(ctx=DEVICES)
        distbn.convert_sync_batchnorm(net)
        assert isinstance(net[0], distbn.SyncBatchNorm)
    layer = net if how == "direct" else net[0]
    with autograd.record():
        ys = [net(mx.nd.ones((2, 1), ctx=c) * v) for c, v in zip(DEVICES, (1, 3))]
    autograd.backward(ys)
    assert abs(ys[0].asnumpy() + 1 / (1 + EPS) ** 0.5).max() < 1e-5
    assert abs(ys[1].asnumpy() - 1 / (1 + EPS) ** 0.5).max() < 1e-5
    for c in DEVICES:  # momentum 0.9 from 0: 0.1 * the global mean
        assert abs(layer.running_mean.data(c).asnumpy() - 0.2).max() < 1e-6


def test_frozen_layers_on_two_devices_need_no_meeting_and_unfreeze_to_sync_again():
    """freeze_batchnorm: each device normalizes with the running statistics alone (device 1
    may train on its own, no exchange waits), which stay as they were on both devices;
    unfreeze_batchnorm: the devices meet again."""
    layer = distbn.SyncBatchNorm(in_channels=1)
    layer.initialize(ctx=DEVICES)
    distbn.freeze_batchnorm(layer)
    with autograd.record():
        y = layer(mx.nd.ones((2, 1), ctx=DEVICES[1]) * 2)
    y.backward()
    assert abs(y.asnumpy() - 2 / (1 + EPS) ** 0.5).max() < 1e-5
    for c in DEVICES:
        assert layer.running_mean.data(c).asnumpy().tolist() == [0.0]
    distbn.unfreeze_batchnorm(layer)
    with autograd.record():
        ys = [layer(mx.nd.ones((2, 1), ctx=c) * v) for c, v in zip(DEVICES, (1, 3))]
    autograd.backward(ys)
    assert abs(ys[0].asnumpy() + 1 / (1 + EPS) ** 0.5).max() < 1e-5
