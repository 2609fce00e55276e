"""Population statistics (distbn.update_bn_stats) and frozen BN (distbn.freeze_batchnorm):
the multi-process proofs (tests/mp/precise_bn.py, tests/mp/freeze.py, each with its negative
control) and single-process checks of the pieces."""
import numpy as np
import mxnet as mx
import pytest
from mxnet import autograd, gluon

import distbn
from distbn import precise_bn
from conftest import MP, horovodrun, python

multiproc = pytest.mark.multiproc


def ok(out, n):
    assert out.count(": OK") == n and "MISMATCH" not in out, out


# --- update_bn_stats against the float64 definition ----------------------------------------

@multiproc
@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("hybridize", [False, True])
def test_synced_layers_equal_the_definition_over_all_workers(np_, hybridize):
    _, out = horovodrun(np_, [MP / "precise_bn.py", "--layer", "sync"]
                        + (["--hybridize"] if hybridize else []), timeout=180)
    ok(out, np_)


@multiproc
@pytest.mark.parametrize("layer, np_", [("local", 2), ("gluon", 4), ("group", 4)])
def test_local_gluon_and_process_set_layers_equal_the_definition(layer, np_):
    """Local BN: every worker's own batches, all workers' counted; process sets: each group's
    global batch; every worker ends with the same statistics either way."""
    _, out = horovodrun(np_, [MP / "precise_bn.py", "--layer", layer, "--hybridize"], timeout=180)
    ok(out, np_)


@multiproc
@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("container", ["generator", "list"])
def test_uneven_batch_counts_stop_at_the_smallest(np_, container):
    _, out = horovodrun(np_, [MP / "precise_bn.py", "--extra-rank"]
                        + (["--as-list"] if container == "list" else []), timeout=180)
    ok(out, np_)
    assert "the workers held different numbers of batches; each used the smallest, 3" in out, out


@multiproc
@pytest.mark.parametrize("layer", ["sync", "gluon"])
def test_numpy_mode_equals_the_definition(layer):
    _, out = horovodrun(2, [MP / "precise_bn.py", "--numpy", "--layer", layer, "--hybridize"],
                        timeout=180)
    ok(out, 2)


# Several CPU devices per worker share MXNet's one temporary-space pool: this network's
# training steps need more than MXNet's 4 copies (64 were too few here; docs/layer.md).
DEVICES_ENV = {"MXNET_CPU_TEMP_COPY": "256", "DISTBN_DEVICE_TIMEOUT": "60"}


@pytest.mark.parametrize("args", [[], ["--hybridize", "--as-list"], ["--numpy", "--hybridize"],
                                  ["--layer", "local"]], ids=["sync", "hybridized-list", "numpy", "local"])
def test_one_worker_with_two_devices_equals_the_definition(args):
    """Each batch in two parts, one per device: a synced layer's batch is their union, a local
    layer's each part alone; every device's copy ends identical."""
    _, out = python([MP / "precise_bn.py", "--devices", "2", *args], env=DEVICES_ENV)
    ok(out, 1)


@multiproc
@pytest.mark.parametrize("args", [["--hybridize"], ["--extra-rank"], ["--batches", "40", "--as-list"]],
                         ids=["hybridized", "uneven-counts", "40-batches-in-flight"])
def test_two_workers_with_two_devices_equal_the_definition(args):
    """40 batches pushed at once put many devices' rounds in flight, ready in a different order
    on each worker: before the workers agreed on the order of their exchanges (distbn/csrc/
    allreduce.cc), this case hung in 2 of 3 runs here."""
    _, out = horovodrun(2, [MP / "precise_bn.py", "--devices", "2", *args], env=DEVICES_ENV)
    ok(out, 2)


@multiproc
@pytest.mark.parametrize("args", [["--layer", "local", "--expect", "sync"], ["--control", "ema"]],
                         ids=["per-device-vs-sync", "running-averages"])
def test_negative_controls_with_two_devices_fail_the_same_check(args):
    code, out = horovodrun(2, [MP / "precise_bn.py", "--devices", "2", *args], env=DEVICES_ENV,
                           check=False)
    assert code != 0 and out.count("MISMATCH statistics") == 2 and ": OK" not in out, out


@pytest.mark.parametrize("cls", [distbn.BatchNorm, gluon.nn.BatchNorm])
def test_channels_last_statistics_are_over_every_other_axis(cls):
    """(N, W, C) data after a dense layer on the last axis: the re-estimated statistics are
    each channel's over N and W, in float64, batch by batch weighted by count."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, flatten=False, in_units=3), cls(axis=-1, in_channels=4))
    net.initialize()
    net.hybridize()
    rs = np.random.RandomState(2)
    xs = [mx.nd.array(rs.randn(n, 5, 3) + 1) for n in (2, 7)]
    distbn.update_bn_stats(net, xs)
    h = np.concatenate([net[0](x).asnumpy().astype(np.float64).reshape(-1, 4) for x in xs])
    per_batch = [net[0](x).asnumpy().astype(np.float64).reshape(-1, 4) for x in xs]
    want_var = sum(len(b) * b.var(0) for b in per_batch) / len(h)
    np.testing.assert_allclose(net[1].running_mean.data().asnumpy(), h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net[1].running_var.data().asnumpy(), want_var, rtol=1e-5, atol=1e-6)


def test_one_process_without_horovodrun():
    for layer in ("sync", "gluon"):
        _, out = python([MP / "precise_bn.py", "--layer", layer, "--hybridize"])
        ok(out, 1)


@multiproc
@pytest.mark.parametrize("args", [["--layer", "local", "--expect", "sync"],
                                  ["--control", "ema"]], ids=["local-vs-sync", "running-averages"])
def test_negative_controls_fail_the_same_check(args):
    """Each worker's own statistics checked against the synced definition, and the moving
    averages (what evaluation uses without re-estimation) against the definition."""
    code, out = horovodrun(2, [MP / "precise_bn.py", *args], timeout=180, check=False)
    assert code != 0 and out.count("MISMATCH statistics") == 2 and ": OK" not in out, out


def test_population_stats_count_each_groups_batch_once():
    """Two workers of one synced group report their halves of each global batch: the global
    batch's variance includes the spread between the halves, and is counted once."""
    def packed(x):  # (n, C) -> [n, n m, n (v + m^2)]
        n = x.shape[0]
        return np.concatenate([[n], x.sum(0), (x ** 2).sum(0)])
    rs = np.random.RandomState(0)
    halves = [[rs.randn(3, 2) + 5, rs.randn(4, 2) - 1], [rs.randn(2, 2), rs.randn(6, 2) + 2]]
    group = (0, 1)
    per_worker = [(group, np.stack([packed(b) for b in halves[r]])) for r in range(2)]
    mean, var = precise_bn.population_stats(per_worker)
    batches = [np.concatenate([halves[0][b], halves[1][b]]) for b in range(2)]
    n = np.array([len(b) for b in batches])
    want_mean = sum(len(b) * b.mean(0) for b in batches) / n.sum()
    want_var = sum(len(b) * b.var(0) for b in batches) / n.sum()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(var, want_var, rtol=1e-12)
    local = [((0,), per_worker[0][1]), ((1,), per_worker[1][1])]  # the same records, local BN
    assert not np.allclose(precise_bn.population_stats(local)[1], want_var)
    with pytest.raises(RuntimeError, match="reported by 1 workers"):
        precise_bn.population_stats([per_worker[0], ((1,), per_worker[1][1])])


def _small_net(hybridize=True):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), distbn.SyncBatchNorm(4, 2),
            gluon.nn.BatchNorm(in_channels=4, use_global_stats=True), gluon.nn.Dense(2, in_units=4))
    net.initialize()
    if hybridize:
        net.hybridize(static_alloc=True)
    return net


def test_frozen_layers_keep_their_statistics_and_the_graph_is_kept():
    net = _small_net()
    x = mx.nd.array(np.random.RandomState(0).randn(8, 3) + 2)
    net(x)
    frozen = net[2]
    frozen.running_mean.set_data(mx.nd.array([1, 2, 3, 4]))
    cached = net._cached_op
    assert distbn.update_bn_stats(net, [x, (x, None)], num_batches=1) == 1
    assert frozen.running_mean.data().asnumpy().tolist() == [1, 2, 3, 4]
    assert net[1].running_mean.data().asnumpy().std() > 0  # re-estimated
    assert net._active and net._cached_op is cached  # hybridized as before, graph kept


def test_nothing_to_estimate_from_leaves_the_statistics():
    net = _small_net(hybridize=False)
    before = net[1].running_var.data().asnumpy().copy()
    assert distbn.update_bn_stats(net, []) == 0
    np.testing.assert_array_equal(net[1].running_var.data().asnumpy(), before)


# --- freeze_batchnorm ----------------------------------------------------------------------

@multiproc
@pytest.mark.parametrize("args", [[], ["--hybridize", "--affine"], ["--layer", "gluon", "--hybridize"]],
                         ids=["sync", "sync-hybridized-affine", "gluon-hybridized"])
def test_frozen_network_does_not_depend_on_the_batch_and_does_no_collective(args):
    _, out = horovodrun(2, [MP / "freeze.py", *args], timeout=180)
    ok(out, 2)


@multiproc
def test_unfrozen_network_fails_the_same_checks():
    code, out = horovodrun(2, [MP / "freeze.py", "--hybridize", "--control", "unfrozen"],
                           timeout=180, check=False)
    assert code != 0 and out.count("MISMATCH output depends on the batch") == 2, out
    assert "engine collectives" in out, out


def test_freeze_then_unfreeze_restores_every_setting():
    net = _small_net()
    net[1].beta.grad_req = "null"  # a user's own choice, kept through freeze/unfreeze
    distbn.freeze_batchnorm(net, affine=True)
    distbn.freeze_batchnorm(net)  # twice: no change, and unfreeze still restores the first state
    assert net[1].use_global_stats and net[2]._kwargs["use_global_stats"]
    assert net[1].gamma.grad_req == "null" and net[3].weight.grad_req == "write"
    x = mx.nd.array(np.random.RandomState(1).randn(6, 3))
    with autograd.record():
        y = net(x)
    y.backward()  # a frozen net trains (gradients reach the dense layers)
    assert net[0].weight.grad().abs().sum().asscalar() > 0
    distbn.unfreeze_batchnorm(net)
    assert not net[1].use_global_stats and net[2]._kwargs["use_global_stats"]  # as it was
    assert net[1].gamma.grad_req == "write" and net[1].beta.grad_req == "null"
