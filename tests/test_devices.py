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
