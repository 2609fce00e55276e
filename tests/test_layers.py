"""Single-process checks of the layers: distbn.BatchNorm == gluon.nn.BatchNorm == the book's
function, imperative and hybridized; Gluon's constructor and parameter names (pretrained
files load both ways); numerical safety; the converter on any network; no collective at size
1. Every test runs three times: as the layers run in one process (MXNet's BatchNorm operator,
``mxnet``), and through the synced graph over a group of one worker (local statistics, an
all-reduce that sums one worker, normalize), with distbn's C++ operators (the CPU path,
``native``) and with the MXNet-operator graph (the GPU path, or no compiler, ``mxnet-ops``).
The synced graph across real workers is tests/test_syncbn_mp.py's."""
import inspect

import numpy as np
import mxnet as mx
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon.model_zoo import vision

import distbn
from distbn import convert, models, native
from distbn.comm import get_comm
from conftest import needs_bfloat16

SHAPES = {2: (32, 7), 4: (16, 5, 6, 6)}


@pytest.fixture(autouse=True, params=["mxnet", "native", "mxnet-ops"])
def kernels(request, monkeypatch):
    """Layers made inside a test take this path (the kernels are picked when a layer is
    built, the graph when it is traced)."""
    if request.param == "mxnet":
        return request.param
    # Every distbn layer builds the synced graph, over the "group" of this one process: the
    # engine's all-reduce over one worker passes the statistics through.
    for cls in (distbn.BatchNorm, distbn.SyncBatchNorm):
        monkeypatch.setattr(cls, "_allreduce_key", lambda self: (self.prefix, (), ()))
    if request.param == "native":
        assert native.kernels()  # built and loaded: the CPU path under test
    else:
        monkeypatch.setattr(native, "kernels", lambda: False)
    return request.param


def test_the_graph_takes_the_path_under_test(kernels):
    layer = distbn.SyncBatchNorm(3)
    graph = layer(mx.sym.var("data")).tojson()
    assert ("distbn_bn_apply" in graph) == (kernels == "native")
    # one worker's statistics: MXNet's operator alone; the synced graph has the engine's
    assert ('"op": "distbn_allreduce"' in graph) == (kernels != "mxnet")


def close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), max(np.abs(want).max(), 1e-3)
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def train_step(layer, x_np, w_np):
    """One training-mode forward/backward with loss sum(y * w); returns y and all grads
    (those of frozen parameters as None)."""
    x = nd.array(x_np)
    x.attach_grad()
    with autograd.record():
        y = layer(x)
        loss = (y * nd.array(w_np)).sum()
    loss.backward()
    if not hasattr(layer, "gamma"):
        return y.asnumpy(), x.grad.asnumpy()
    return (y.asnumpy(), x.grad.asnumpy(),
            *(None if p.grad_req == "null" else p.grad().asnumpy() for p in (layer.gamma, layer.beta)))


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("ndim", [2, 4])
def test_batchnorm_equals_gluon_over_steps_and_after_save_load(ndim, hybrid, tmp_path):
    shape, channels = SHAPES[ndim], SHAPES[ndim][1]
    ours, ref = distbn.BatchNorm(), gluon.nn.BatchNorm()  # channels from the first input
    ours.initialize(); ref.initialize()
    if hybrid:
        ours.hybridize(static_alloc=True, static_shape=True)
    rs = np.random.RandomState(0)
    for _ in range(3):
        x, w = (2 + 3 * rs.randn(*shape)).astype(np.float32), rs.randn(*shape).astype(np.float32)
        for got, want in zip(train_step(ours, x, w), train_step(ref, x, w)):
            close(got, want)
        close(ours.running_mean.data().asnumpy(), ref.running_mean.data().asnumpy())
        close(ours.running_var.data().asnumpy(), ref.running_var.data().asnumpy())
    x = nd.array(rs.randn(*shape))
    close(ours(x).asnumpy(), ref(x).asnumpy())  # prediction mode: running statistics
    ours.save_parameters(str(tmp_path / "bn.params"))
    loaded = distbn.BatchNorm(channels, ndim)
    loaded.load_parameters(str(tmp_path / "bn.params"))
    close(loaded(x).asnumpy(), ref(x).asnumpy())
    close(loaded.running_var.data().asnumpy(), ref.running_var.data().asnumpy())


@pytest.mark.parametrize("ndim", [2, 4])
def test_layer_equals_the_books_function(ndim):
    shape, channels = SHAPES[ndim], SHAPES[ndim][1]
    book_shape = (1, channels) + (1,) * (ndim - 2)
    layer = distbn.BatchNorm(channels, ndim)  # the book's positional form
    layer.initialize()
    rs = np.random.RandomState(1)
    gamma, beta = nd.array(1 + rs.rand(channels)), nd.array(rs.randn(channels))
    layer.gamma.set_data(gamma); layer.beta.set_data(beta)
    mm, mv = nd.zeros(book_shape), nd.ones(book_shape)
    for _ in range(2):
        x_np, w_np = rs.randn(*shape).astype(np.float32), rs.randn(*shape).astype(np.float32)
        y, dx, dgamma, dbeta = train_step(layer, x_np, w_np)
        x, g, b = nd.array(x_np), gamma.reshape(book_shape), beta.reshape(book_shape)
        for a in (x, g, b):
            a.attach_grad()
        with autograd.record():
            y_book, mm, mv = distbn.batch_norm(x, g, b, mm, mv, eps=1e-5, momentum=0.9)
            (y_book * nd.array(w_np)).sum().backward()
        for got, want in [(y, y_book), (dx, x.grad), (dgamma, g.grad), (dbeta, b.grad),
                          (layer.running_mean.data(), mm), (layer.running_var.data(), mv)]:
            close(got.asnumpy() if hasattr(got, "asnumpy") else got, want.asnumpy())
    x = nd.array(rs.randn(*shape))
    y_book, _, _ = distbn.batch_norm(x, gamma.reshape(book_shape), beta.reshape(book_shape),
                                     mm, mv, eps=1e-5, momentum=0.9)
    close(layer(x).asnumpy(), y_book.asnumpy())


@pytest.mark.parametrize("shape", [(256, 6, 24, 24), (256, 120)])
def test_large_mean_small_spread_first_step(shape, kernels):
    """1e4 +- 0.1 in float32: synced statistics give output of std 1 on the very first batch.
    One worker's statistics are MXNet's operator's, exactly Gluon's (whose float32 sums give a
    std of ~0.01 at the convolution shape here: README)."""
    rs = np.random.RandomState(2)
    x = nd.array(1e4 + 0.1 * rs.randn(*shape), dtype="float32")
    layer = distbn.SyncBatchNorm(shape[1], len(shape))
    layer.initialize()
    layer.hybridize()
    with autograd.record():
        y = layer(x).asnumpy()
    if kernels == "mxnet":
        ref = gluon.nn.BatchNorm(in_channels=shape[1])
        ref.initialize()
        with autograd.record():
            np.testing.assert_array_equal(y, ref(x).asnumpy())
        return
    axes = (0, 2, 3) if len(shape) == 4 else (0,)
    assert np.abs(y.std(axis=axes) - 1).max() < 1e-2, y.std(axis=axes)
    assert np.abs(y.mean(axis=axes)).max() < 1e-2
    true_var = (x.asnumpy().astype(np.float64)).var(axis=axes)
    close(layer.running_var.data().asnumpy(), 0.9 + 0.1 * true_var, rtol=1e-4)


def test_sync_layer_at_size_one_does_no_collective():
    comm = get_comm()
    assert comm.size == 1
    net = models.lenet("sync")
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True)
    before = comm.collectives
    x = nd.random.uniform(shape=(8, 1, 28, 28))
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    net(x)
    nd.waitall()
    assert comm.collectives == before


def test_running_statistics_move_in_training_only(kernels):
    """Synced statistics update the running ones in the training forward pass (so they move
    even where no backward runs); MXNet's operator, one worker's statistics, in the backward
    pass, as Gluon's layer. Never in prediction."""
    layer = distbn.BatchNorm(2)
    layer.initialize()
    layer.hybridize()
    x = nd.array([[1.0, 10.0], [3.0, 30.0]])
    x.attach_grad()
    layer(x)
    np.testing.assert_array_equal(layer.running_mean.data().asnumpy(), [0, 0])
    with autograd.record():
        y = layer(x)
    moved = layer.running_mean.data().asnumpy()
    np.testing.assert_array_equal(moved != 0, [kernels != "mxnet"] * 2)
    y.backward()
    close(layer.running_mean.data().asnumpy(), [0.2, 2.0])
    close(layer.running_var.data().asnumpy(), [0.9 + 0.1 * 1.0, 0.9 + 0.1 * 100.0])


def test_gluon_arguments_are_accepted_and_mean_the_same():
    ours = inspect.signature(distbn.SyncBatchNorm.__init__).parameters
    ours_all = set(ours) | set(inspect.signature(distbn.BatchNorm.__init__).parameters)
    for cls in (gluon.nn.BatchNorm, gluon.contrib.nn.SyncBatchNorm):
        theirs = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        assert theirs <= ours_all, theirs - ours_all
    rs = np.random.RandomState(3)
    x, w = (1 + rs.randn(8, 4, 3, 3)).astype(np.float32), rs.randn(8, 4, 3, 3).astype(np.float32)
    kw = dict(momentum=0.8, epsilon=1e-3, center=False, scale=False,
              beta_initializer="ones", gamma_initializer=mx.init.Constant(2.0),
              running_mean_initializer="ones", running_variance_initializer=mx.init.Constant(3.0))
    ours, ref = distbn.SyncBatchNorm(in_channels=4, num_devices=1, key="k", **kw), gluon.nn.BatchNorm(**kw)
    for layer in (ours, ref):
        layer.initialize()
    assert [p.grad_req for p in ours.params.values()] == [p.grad_req for p in ref.params.values()]
    got, want = train_step(ours, x, w), train_step(ref, x, w)
    close(got[0], want[0]); close(got[1], want[1])  # y and dx (gamma, beta frozen)
    close(ours.running_var.data().asnumpy(), ref.running_var.data().asnumpy())
    # Frozen statistics and a fused ReLU (Gluon spells the latter BatchNormReLU).
    ours = distbn.SyncBatchNorm(in_channels=4, use_global_stats=True, fuse_relu=True)
    ref = gluon.nn.HybridSequential()
    ref.add(gluon.nn.BatchNorm(use_global_stats=True, in_channels=4), gluon.nn.Activation("relu"))
    ours.initialize(); ref.initialize()
    ours.running_mean.set_data(nd.array(rs.randn(4))); ref[0].running_mean.set_data(ours.running_mean.data())
    for got, want in zip(train_step(ours, x, w)[:2], train_step(ref, x, w)[:2]):
        close(got, want)


# Every channel axis Gluon's BatchNorm takes, on 2-D to 5-D data (NC, NCW/NWC, NCHW/NHWC,
# NCDHW/NDHWC and the axes in between), legacy and numpy mode, imperative and hybridized.
AXES = [(1, (6, 3)), (-1, (6, 3)), (0, (3, 6)), (1, (4, 3, 5)), (-1, (4, 5, 3)), (-2, (4, 3, 5)),
        (1, (4, 3, 5, 5)), (-1, (4, 5, 5, 3)), (2, (4, 5, 3, 5)), (-1, (2, 3, 4, 4, 3)),
        (2, (2, 3, 4, 4, 3)), (-4, (2, 3, 4, 4, 3))]


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("mode", ["legacy", "numpy"])
@pytest.mark.parametrize("axis, shape", AXES, ids=[f"{a}-{len(s)}d" for a, s in AXES])
def test_any_axis_and_numpy_mode_equal_gluon(axis, shape, mode, hybrid, kernels):
    """Output, input and parameter gradients, running statistics and prediction equal
    ``gluon.nn.BatchNorm(axis=...)``'s, through the same graph as axis 1; in numpy mode the
    layer takes and returns ``mx.np`` arrays, as Gluon's does."""
    rs = np.random.RandomState(len(shape) + axis)
    x, w = 2 + rs.randn(*shape), rs.randn(*shape)
    results = []
    for make in (lambda: gluon.nn.BatchNorm(axis=axis), lambda: distbn.BatchNorm(axis=axis)):
        if mode == "numpy":
            mx.npx.set_np()
        try:
            array = mx.np.array if mode == "numpy" else nd.array
            layer = make()
            layer.initialize()
            if hybrid:
                layer.hybridize()
            xin = array(x, dtype="float32")
            xin.attach_grad()
            with autograd.record():
                y = layer(xin)
                (y * array(w, dtype="float32")).sum().backward()
            assert type(y) is type(xin), type(y)
            results.append([y.asnumpy(), xin.grad.asnumpy(), layer.gamma.grad().asnumpy(),
                            layer.beta.grad().asnumpy(), layer.running_mean.data().asnumpy(),
                            layer.running_var.data().asnumpy(), layer(xin).asnumpy()])
        finally:
            mx.npx.reset_np()
    for got, want in zip(results[1], results[0]):
        close(got, want)


def test_axis_is_checked_on_imperative_calls():
    layer = distbn.BatchNorm(3, axis=2)
    layer.initialize()
    with pytest.raises(ValueError, match="expected 3 channels on axis 2"):
        layer(nd.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="channel axis 2 does not exist"):
        layer(nd.ones((2, 3)))
    with pytest.raises(TypeError, match="axis must be an int"):
        distbn.BatchNorm(axis=1.0)


@pytest.mark.parametrize("hybrid", [False, True])
def test_empty_batch_in_one_process(kernels, hybrid):
    """Numpy mode: an empty batch gives an empty output and input gradient, zero parameter
    gradients and running statistics as they were (MXNet's own operator, Gluon's layer, fills
    both with NaN); the MXNet-operator graph refuses it in one line."""
    mx.npx.set_np()
    try:
        layer = distbn.SyncBatchNorm(3, axis=-1)
        layer.initialize()
        if hybrid:
            layer.hybridize()
            layer(mx.np.ones((2, 4, 3)))  # compiled, in prediction mode (statistics kept)
        layer.running_mean.set_data(mx.np.array([1.0, 2.0, 3.0]))
        x = mx.np.zeros((0, 4, 3))
        x.attach_grad()
        if kernels == "mxnet-ops":
            with pytest.raises(ValueError, match=r"empty input of shape \(0, 4, 3\): the MXNet-operator"):
                layer(x)
            return
        with autograd.record():
            y = layer(x)
            (y * y).sum().backward()
        assert y.shape == (0, 4, 3) and x.grad.shape == (0, 4, 3)
        assert layer.gamma.grad().asnumpy().tolist() == [0, 0, 0]
        assert layer.beta.grad().asnumpy().tolist() == [0, 0, 0]
        assert layer.running_mean.data().asnumpy().tolist() == [1, 2, 3]
        assert layer.running_var.data().asnumpy().tolist() == [1, 1, 1]
    finally:
        mx.npx.reset_np()


def test_converter_keeps_the_axis():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, flatten=False), gluon.nn.BatchNorm(axis=-1))
    distbn.convert_sync_batchnorm(net)
    assert isinstance(net[1], distbn.SyncBatchNorm) and net[1].axis == -1


class _Block(gluon.HybridBlock):
    """A residual block in GluonCV's manner: ``norm_layer`` and ``norm_kwargs``."""

    def __init__(self, norm_layer, norm_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        norm_kwargs = norm_kwargs or {}
        with self.name_scope():
            self.conv = gluon.nn.Conv2D(8, 3, padding=1, in_channels=3)
            self.bn1 = norm_layer(in_channels=8, **norm_kwargs)
            self.bn2 = norm_layer(gamma_initializer="zeros", **norm_kwargs)  # channels deferred
            self.bn3 = norm_layer(scale=True, **norm_kwargs)
            self.dense = gluon.nn.Dense(4)

    def hybrid_forward(self, F, x):
        h = self.bn1(self.conv(x))
        return self.dense(F.relu(self.bn3(h + self.bn2(h))))


def test_norm_layer_drop_in_trains_like_gluon_hybridized():
    rs = np.random.RandomState(4)
    nets = []
    for norm_layer, norm_kwargs in [(gluon.nn.BatchNorm, {}),
                                    (distbn.SyncBatchNorm, {"num_devices": 1})]:
        mx.random.seed(5)
        net = _Block(norm_layer, norm_kwargs)
        net.initialize(mx.init.Xavier())
        net.hybridize(static_alloc=True, static_shape=True)
        nets.append(net)
    _copy(nets[0], nets[1], nd.array(rs.rand(4, 3, 5, 5)))
    for net in nets:
        _train(net, gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1,
                                                                 "momentum": 0.9}),
               steps=3, seed=6, shape=(4, 3, 5, 5), classes=4)
    close(np.concatenate(_values(nets[1])), np.concatenate(_values(nets[0])), rtol=1e-4)


def _copy(src, dst, x):
    """Finish deferred shapes with one prediction pass, then copy values by structure."""
    src(x); dst(x)
    theirs = src._collect_params_with_prefix()
    for key, p in dst._collect_params_with_prefix().items():
        p.set_data(theirs[key].data())


def _train(net, trainer, steps, seed, shape=(16, 1, 28, 28), classes=10):
    rs = np.random.RandomState(seed)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(steps):
        x = nd.array(rs.rand(*shape))
        y = nd.array(rs.randint(0, classes, shape[0]))
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(shape[0])


def _values(net):
    return [p.data().asnumpy().ravel() for _, p in sorted(net._collect_params_with_prefix().items())]


@pytest.mark.parametrize("bn", ["gluon", "custom"])
def test_converter_keeps_values_and_the_trainer_continues_identically(bn):
    mx.random.seed(0)
    net = models.lenet(bn)
    net.initialize(mx.init.Xavier())
    ref = models.lenet(bn)
    ref.initialize()
    for p, q in zip(net.collect_params().values(), ref.collect_params().values()):
        q.set_data(p.data())
    opt = {"learning_rate": 0.5, "momentum": 0.5}
    trainer = gluon.Trainer(net.collect_params(), "sgd", opt)  # made before converting
    ref_trainer = gluon.Trainer(ref.collect_params(), "sgd", opt)
    _train(net, trainer, steps=2, seed=1)
    _train(ref, ref_trainer, steps=2, seed=1)
    before = _values(net)
    names = sorted(net.collect_params())
    converted = distbn.convert_sync_batchnorm(net)
    assert converted is net and sorted(converted.collect_params()) == names
    assert [type(b) for b in convert.bn_layers(converted)] == [distbn.SyncBatchNorm] * 4
    for a, b in zip(_values(converted), before):
        np.testing.assert_array_equal(a, b)
    x = nd.array(np.random.RandomState(3).rand(16, 1, 28, 28))
    close(converted(x).asnumpy(), ref(x).asnumpy())
    converted.hybridize(static_alloc=True)
    _train(converted, trainer, steps=3, seed=4)
    _train(ref, ref_trainer, steps=3, seed=4)
    # All values at once: the conv/dense biases before BN get no real gradient (BN removes
    # them), so each alone is float noise around 1e-7.
    close(np.concatenate(_values(converted)), np.concatenate(_values(ref)), rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18_v1", "mobilenetv2_0.25", "resnet18_v2"])
@pytest.mark.parametrize("when", ["before init", "after init", "after a pass", "hybridized"])
def test_converter_on_model_zoo_networks(arch, when):
    x = nd.array(np.random.RandomState(7).rand(2, 3, 32, 32))
    mx.random.seed(8)
    net = vision.get_model(arch, classes=10)
    if when != "before init":
        net.initialize(mx.init.Xavier())
    if when == "hybridized":
        net.hybridize(static_alloc=True, static_shape=True)
    want = net(x).asnumpy() if when in ("after a pass", "hybridized") else None
    net = distbn.convert_sync_batchnorm(net)
    if when == "before init":
        net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    got = net(x).asnumpy()
    if want is not None:
        close(got, want)  # same parameters, prediction unchanged
    assert all(isinstance(b, distbn.SyncBatchNorm) for b in convert.bn_layers(net))
    with autograd.record():
        y = net(x)
    y.backward()
    assert np.isfinite(y.asnumpy()).all()


def test_pretrained_parameter_files_load_both_ways(tmp_path):
    """A file saved from a model-zoo network with Gluon's BN (as a pretrained file is) loads
    into the same network converted to SyncBatchNorm, and a file saved from that back into
    Gluon's."""
    x = nd.array(np.random.RandomState(9).rand(2, 3, 32, 32))
    gluon_net = vision.get_model("resnet18_v1", classes=10)
    gluon_net.initialize(mx.init.Xavier())
    gluon_net(x)
    with autograd.record():  # move the running statistics away from their initial values
        gluon_net(x).backward()
    gluon_net.save_parameters(str(tmp_path / "pretrained.params"))
    sync_net = distbn.convert_sync_batchnorm(vision.get_model("resnet18_v1", classes=10))
    sync_net.load_parameters(str(tmp_path / "pretrained.params"))
    sync_net.hybridize()
    close(sync_net(x).asnumpy(), gluon_net(x).asnumpy())
    sync_net.save_parameters(str(tmp_path / "back.params"))
    again = vision.get_model("resnet18_v1", classes=10)
    again.load_parameters(str(tmp_path / "back.params"))
    np.testing.assert_array_equal(again(x).asnumpy(), gluon_net(x).asnumpy())


def test_whole_network_hybridized_equals_imperative():
    mx.random.seed(5)
    eager, hybrid = models.lenet("sync"), models.lenet("sync")
    eager.initialize(mx.init.Xavier()); hybrid.initialize()
    for p, q in zip(eager.collect_params().values(), hybrid.collect_params().values()):
        q.set_data(p.data())
    hybrid.hybridize(static_alloc=True, static_shape=True)
    x = nd.array(np.random.RandomState(6).rand(8, 1, 28, 28))
    outs = []
    for net in (eager, hybrid):
        with autograd.record():
            y = net(x)
        y.backward()
        outs.append([y.asnumpy(), net(x).asnumpy()]
                    + [p.grad().asnumpy() for p in net.collect_params().values()
                       if p.grad_req != "null"]
                    + [p.data().asnumpy() for p in net.collect_params().values()])
    for a, b in zip(*outs):
        close(a, b)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("dtype, eps", [("float16", 2.0 ** -11),
                                        pytest.param("bfloat16", 2.0 ** -8, marks=needs_bfloat16)])
def test_half_precision_data_in_and_out(dtype, eps, hybrid, kernels):
    """float16 and bfloat16 data with float32 parameters (as AMP and ``cast('float16')`` make
    them): output and input gradient in the data's type, equal to the float32 layer's on the
    same values up to the type's rounding (a few units of ``eps`` of the largest value)."""
    rs = np.random.RandomState(0)
    x = 3 + rs.randn(8, 5, 4, 4)
    w = rs.randn(*x.shape)

    def half(a):  # numpy has no bfloat16: MXNet's AMP names it with a structured dtype
        from mxnet.contrib.amp.amp import bfloat16
        return nd.amp_cast(nd.array(a), dtype=bfloat16 if dtype == "bfloat16" else dtype)

    def f32(a):
        return nd.amp_cast(a, dtype="float32").asnumpy()

    x = f32(half(x))  # values the half type holds exactly: both runs see the same data
    if dtype == "bfloat16" and hybrid and kernels == "native":
        # MXNet's extension API cannot pass bfloat16 into a graph's distbn operator (AMP
        # never does: it runs the layer's reshape in float32); an NDArray is cast instead.
        layer = distbn.BatchNorm(5)
        layer.initialize()
        layer.hybridize()
        with pytest.raises(mx.base.MXNetError, match="bfloat16 data cannot reach"):
            layer(half(x)).wait_to_read()
        return
    results = {}
    for kind in ("float32", dtype):
        layer = distbn.BatchNorm(5)
        layer.initialize()
        if kind == "float16":
            layer.cast("float16")  # as users do; BN's parameters stay float32
        if hybrid:
            layer.hybridize()
        xin = nd.array(x) if kind == "float32" else half(x)
        xin.attach_grad()
        with autograd.record():
            y = layer(xin)
            loss = (nd.amp_cast(y, dtype="float32") * nd.array(w)).sum()
        loss.backward()
        assert y.dtype == xin.dtype and xin.grad.dtype == xin.dtype, (y.dtype, xin.grad.dtype)
        results[kind] = (f32(y), f32(xin.grad), layer.gamma.grad().asnumpy(),
                         layer.running_var.data().asnumpy())
    for got, want in zip(results[dtype], results["float32"]):
        close(got, want, rtol=8 * eps)


def test_wrong_input_is_a_clear_error():
    layer = distbn.BatchNorm(3, num_dims=4)
    layer.initialize()
    with pytest.raises(ValueError, match="expected 4-D input"):
        with autograd.record():
            layer(nd.ones((2, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        layer(nd.ones((2, 4, 1, 1)))
    with pytest.raises(ValueError, match="num_dims"):
        distbn.BatchNorm(3, num_dims=3)


@pytest.mark.parametrize("bn", ["custom", "sync"])
def test_lenet_tracks_gluon_batchnorm_over_many_steps(bn):
    """Ten SGD steps of the hybridized LeNet with distbn's BN track Gluon's BN.

    Ten steps: around step 11 of this data the two runs part with a discrete jump (5e-6 to
    7e-5, then 2e-3) although both sides' BN statistics were checked to stay within 1e-6 of
    float64 ones there; the signature of a non-smooth point such as a max-pool tie."""
    mx.random.seed(7)
    ours, ref = models.lenet(bn), models.lenet("gluon")
    ours.initialize(mx.init.Xavier()); ref.initialize()
    for p, q in zip(ours.collect_params().values(), ref.collect_params().values()):
        q.set_data(p.data().reshape(q.shape))
    ours.hybridize(static_alloc=True)
    opt = {"learning_rate": 0.1}
    for net in (ours, ref):
        _train(net, gluon.Trainer(net.collect_params(), "sgd", opt), steps=10, seed=8)
    close(np.concatenate(_values(ours)), np.concatenate(_values(ref)), rtol=1e-4)
