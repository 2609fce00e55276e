"""examples/: each script runs as a user would run it (tiny settings), so none can rot; and
distbn.broadcast_parameters, which they rely on."""
import re

import mxnet as mx
import pytest
from mxnet import nd
from mxnet.gluon.model_zoo import vision

import distbn
from conftest import MP, SHARED_DATA, horovodrun, python

ENV = {"DISTBN_DATA_DIR": str(SHARED_DATA)}


def losses(out):
    return [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", out)]


def test_book_multi_device_loop_in_one_process():
    """examples/devices.py: the book's loop over two CPU devices; the loss falls and both
    devices end with the same parameters and running statistics."""
    _, out = python(["examples/devices.py", "--devices", 2, "--steps", 30], env=ENV, timeout=300)
    got = losses(out)
    assert len(got) == 3 and got[-1] < got[0], out
    assert "rank 0/1 devices=2: largest difference between devices 0\n" in out, out


@pytest.mark.multiproc
def test_book_multi_device_loop_on_two_workers():
    _, out = horovodrun(2, ["examples/devices.py", "--devices", 2, "--steps", 20], env=ENV,
                        timeout=300)
    assert out.count("devices=2: largest difference between devices 0\n") == 2, out
    assert all(v == v for v in losses(out)), out


@pytest.mark.multiproc
def test_horovod_script_with_pretrained_weights(tmp_path):
    """A weights file saved from the model-zoo network with Gluon's BN (as a pretrained file
    would be) loads into the converted one; two workers train."""
    weights = tmp_path / "resnet18_v1.params"
    net = vision.resnet18_v1(classes=10)
    net.initialize(mx.init.Xavier())
    net(nd.zeros((1, 1, 28, 28)))
    net.save_parameters(str(weights))
    _, out = horovodrun(2, ["examples/horovod_script.py", "--weights", weights, "--steps", 4,
                            "--batch", 8], env=ENV, timeout=300)
    assert len(losses(out)) == 1 and losses(out)[0] > 0, out
    assert re.search(r"test accuracy 0\.\d+ on 1000 examples", out), out


@pytest.mark.multiproc
def test_gluoncv_style_network_trains_under_horovod():
    _, out = horovodrun(2, ["examples/gluoncv_style.py", "--steps", 4, "--batch", 8], env=ENV,
                        timeout=300)
    assert len(losses(out)) == 1, out


def test_book_example_one_process_all_three_agree():
    _, out = python(["examples/book.py"])
    diffs = dict(re.findall(r"rank 0/1 (.+): max \|y - from scratch\| = (\S+)", out))
    assert set(diffs) == {"from scratch", "distbn.BatchNorm", "distbn.SyncBatchNorm"}, out
    assert all(float(d) < 1e-4 for d in diffs.values()), out


@pytest.mark.multiproc
def test_book_example_two_workers_only_the_synced_layer_differs():
    """At 2 workers the from-scratch function and distbn.BatchNorm use each worker's batch,
    the synced layer both batches: it alone departs from the from-scratch output."""
    _, out = horovodrun(2, ["examples/book.py"], timeout=180)
    for rank in (0, 1):
        diffs = dict(re.findall(rf"rank {rank}/2 (.+): max \|y - from scratch\| = (\S+)", out))
        assert float(diffs["distbn.BatchNorm"]) < 1e-4, out
        assert float(diffs["distbn.SyncBatchNorm"]) > 1e-3, out


@pytest.mark.multiproc
@pytest.mark.parametrize("bn", ["sync", "gluon"])
def test_broadcast_parameters_after_a_hybridized_prediction_pass(bn):
    _, out = horovodrun(2, [MP / "broadcast.py", "--bn", bn], timeout=180)
    assert out.count(": OK") == 2, out


@pytest.mark.multiproc
def test_broadcast_parameters_sets_every_device_of_every_worker():
    """2 workers x 2 devices, all four copies different before: all equal rank 0's first after."""
    _, out = horovodrun(2, [MP / "broadcast.py", "--bn", "sync", "--devices", "2"], timeout=180)
    assert out.count("distinct copies before: 4, after: 1: OK") == 2, out


@pytest.mark.multiproc
def test_horovods_own_broadcast_fails_there():
    """The control: the same sequence with hvd.broadcast per parameter (as Horovod's
    broadcast_parameters does) meets oneDNN's layout."""
    code, out = horovodrun(2, [MP / "broadcast.py", "--bn", "gluon", "--via", "horovod"],
                           timeout=180, check=False)
    assert code != 0 and "We can't generate TBlob for MKLDNN data" in out, out


def test_broadcast_parameters_says_what_to_do_first():
    net = vision.resnet18_v1(classes=10)
    with pytest.raises(RuntimeError, match="not initialized: call net.initialize"):
        distbn.broadcast_parameters(net)
    net.initialize()
    with pytest.raises(RuntimeError, match="no shape yet .* run one forward pass first"):
        distbn.broadcast_parameters(net)
    net(nd.zeros((1, 1, 28, 28)))
    distbn.broadcast_parameters(net)  # one process: the checks pass, nothing to send
