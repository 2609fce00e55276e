"""Getting a trained network out: revert_sync_batchnorm, distbn.export (MXNet and ONNX files that
load without distbn), the trainer's export/ folder, serving it (examples/serve.py), and the
checksums of checkpoints and exports."""
import json
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import distbn
from distbn import convert, storage
from distbn.export import ExportError, export
from conftest import MP, ROOT, SHARED_DATA, horovodrun, python

ENV = {"DISTBN_DATA_DIR": str(SHARED_DATA)}
SERVE_VENV = ROOT / ".venv-serve"


def net_of(*bns, ctx=mx.cpu(), dense_bn=None):
    """conv BN sigmoid conv BN flatten dense [BN]: the layers the tests vary, on ``ctx``, with
    every parameter (and running statistic) drawn away from its initial value."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2, use_bias=False), bns[0],
            gluon.nn.Activation("sigmoid"), gluon.nn.Conv2D(5, 3, in_channels=4), bns[1],
            gluon.nn.Flatten(), gluon.nn.Dense(3, in_units=5 * 4 * 4))
    if dense_bn is not None:
        net.add(dense_bn)
    net.initialize(ctx=ctx)
    rng = np.random.RandomState(0)
    for p in net.collect_params().values():
        value = rng.uniform(0.5, 1.5, p.shape)
        for d in p.list_data():
            d[:] = value
    return net


X = mx.nd.array(np.random.RandomState(1).normal(size=(7, 2, 8, 8)))


def predict(net, x=X):
    return net(x).asnumpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- revert_sync_batchnorm ------------------------------------------------------------------

def test_revert_makes_gluon_layers_with_the_same_parameters_and_prediction():
    net = net_of(distbn.SyncBatchNorm(4, scale=False), distbn.BatchNorm(5, num_dims=4),
                 dense_bn=distbn.SyncBatchNorm(3, momentum=0.8, epsilon=1e-3))
    distbn.freeze_batchnorm(net[4:5])
    net.hybridize()
    before, params = predict(net), list(net.collect_params().values())
    assert distbn.revert_sync_batchnorm(net) is net
    assert [type(b) for b in convert.bn_layers(net)] == [gluon.nn.BatchNorm] * 3
    assert list(net.collect_params().values()) == params  # the same Parameter objects
    first, frozen, last = convert.bn_layers(net)
    assert first._kwargs["fix_gamma"] and first.gamma.grad_req == "null"
    assert frozen._kwargs["use_global_stats"] and not frozen._kwargs["fix_gamma"]
    assert last._kwargs["momentum"] == 0.8 and last._kwargs["eps"] == 1e-3
    np.testing.assert_array_equal(predict(net), before)
    distbn.unfreeze_batchnorm(net)  # the freeze's record went along
    assert not frozen._kwargs["use_global_stats"]


def test_revert_keeps_the_devices_the_axis_and_a_fused_relu():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(6, in_units=4, flatten=False), distbn.SyncBatchNorm(6, axis=-1),
            distbn.BatchNorm(6, axis=-1, fuse_relu=True))
    net.initialize(ctx=[mx.cpu(0), mx.cpu(1)])
    x = mx.nd.array(np.random.RandomState(2).normal(size=(3, 5, 4)))
    before = predict(net, x)
    distbn.revert_sync_batchnorm(net)
    assert type(net[1]) is gluon.nn.BatchNorm and [type(b) for b in net[2]] == [
        gluon.nn.BatchNorm, gluon.nn.Activation]  # the fused ReLU: after the layer
    assert net[1]._kwargs["axis"] == -1 and net[1].gamma.list_ctx() == [mx.cpu(0), mx.cpu(1)]
    np.testing.assert_allclose(predict(net, x), before, rtol=1e-5, atol=1e-6)


def test_revert_before_initialization_and_of_contrib_and_back():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3), mx.gluon.contrib.nn.SyncBatchNorm(num_devices=1),
            distbn.SyncBatchNorm())
    distbn.revert_sync_batchnorm(net)
    assert [type(b) for b in net[1:]] == [gluon.nn.BatchNorm] * 2
    net.initialize()
    net(X)  # shapes from the first batch, as before the revert
    assert net[2].gamma.shape == (4,)
    distbn.convert_sync_batchnorm(net)
    assert [type(b) for b in net[1:]] == [distbn.SyncBatchNorm] * 2


@pytest.mark.multiproc
def test_two_workers_revert_and_export_the_same_as_one_process(tmp_path):
    """tests/mp/export.py: after synced training steps at 2 workers, reverting leaves each
    worker's prediction unchanged, each worker's export holds only MXNet's operators, and
    both workers and a one-process run of the same steps write the same files."""
    horovodrun(2, [MP / "export.py", tmp_path / "two"], timeout=240)
    python([MP / "export.py", tmp_path / "one"], timeout=240)
    two, one = tmp_path / "two", tmp_path / "one" / "rank0"
    for r in (0, 1):  # the export holds MXNet's operators only; the plain trace does not
        assert "distbn" not in (two / f"rank{r}" / "model-symbol.json").read_text()
        assert "distbn_allreduce" in (two / f"rank{r}" / "naive-symbol.json").read_text()
    assert "distbn" not in (one / "naive-symbol.json").read_text()  # one worker: MXNet's op
    graph = (one / "model-symbol.json").read_bytes()  # byte for byte, whatever the workers
    assert (two / "rank0" / "model-symbol.json").read_bytes() == graph
    assert (two / "rank1" / "model-symbol.json").read_bytes() == graph
    assert (two / "rank0" / "model.onnx").read_bytes() == (two / "rank1" / "model.onnx").read_bytes()
    # The values: identical on the two workers; one process on the concatenated batch agrees
    # up to float32 rounding (its sums run in another order).
    two = [mx.nd.load(str(two / f"rank{r}" / "model-0000.params")) for r in (0, 1)]
    one = mx.nd.load(str(one / "model-0000.params"))
    for k in one:
        np.testing.assert_array_equal(two[0][k].asnumpy(), two[1][k].asnumpy())
        np.testing.assert_allclose(two[0][k].asnumpy(), one[k].asnumpy(), rtol=1e-4, atol=1e-5)


# --- distbn.export --------------------------------------------------------------------------

def without_distbn(files, x):
    """The exported network's output on ``x``, computed in a process where importing distbn or
    horovod fails."""
    code = ("import sys, numpy as np\n"
            "sys.modules['distbn'] = sys.modules['horovod'] = None  # import fails\n"
            "import mxnet as mx\n"
            f"net = mx.gluon.SymbolBlock.imports({str(files[0])!r}, ['data'], {str(files[1])!r})\n"
            f"np.save(sys.argv[1], net(mx.nd.array(np.load(sys.argv[2]))).asnumpy())\n")
    out, inp = files[0].parent / "out.npy", files[0].parent / "in.npy"
    np.save(inp, x)
    subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(out), str(inp)], check=True,
                   timeout=120)
    return np.load(out)


@pytest.fixture(scope="module")
def onnxruntime_env():
    """launch/serve_env.sh's environment: onnxruntime with its own numpy, no MXNet."""
    subprocess.run(["bash", ROOT / "launch" / "serve_env.sh", SERVE_VENV], check=True, timeout=600)
    return SERVE_VENV / "bin" / "python"


def onnxruntime_run(python_bin, onnx_file, x):
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "assert 'mxnet' not in sys.modules\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "np.save(sys.argv[2], s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[3])})[0])\n")
    out, inp = onnx_file.parent / "ort-out.npy", onnx_file.parent / "ort-in.npy"
    np.save(inp, x)
    proc = subprocess.run([str(python_bin), "-c", code, str(onnx_file), str(out), str(inp)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return np.load(out), proc.stderr


def distbn_net():
    return net_of(distbn.SyncBatchNorm(4, scale=False), distbn.BatchNorm(5),
                  dense_bn=distbn.SyncBatchNorm(3))


@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
def test_export_loads_without_distbn_and_runs_in_onnxruntime(tmp_path, onnxruntime_env, fold):
    import onnx
    net = distbn_net()
    files = export(net, tmp_path / "m", (1, 2, 8, 8), fold=fold)
    assert [f.name for f in files] == ["m-symbol.json", "m-0000.params", "m.onnx", "m.sha256"]
    assert type(net[1]) is distbn.SyncBatchNorm  # the network itself is left as it was
    ops = [n["op"] for n in json.loads(files[0].read_text())["nodes"] if n["op"] != "null"]
    assert ("BatchNorm" in ops) != fold and not any("distbn" in op for op in ops), ops
    model = onnx.load(str(files[2]))
    assert [i.name for i in model.graph.input] == ["data"]  # parameters are initializers
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 0  # batch: free
    for batch in (1, 7, 64):  # any batch size
        x = np.random.RandomState(batch).normal(size=(batch, 2, 8, 8)).astype(np.float32)
        ref = predict(net, mx.nd.array(x))
        assert rel(without_distbn(files, x), ref) <= (1e-5 if fold else 0), batch
        got, log = onnxruntime_run(onnxruntime_env, files[2], x)
        assert rel(got, ref) <= 1e-4, batch
        assert "initializer" not in log.lower(), log


def test_export_writes_gamma_as_one_where_the_layer_ignores_it(tmp_path, onnxruntime_env):
    """Negative control: the same ONNX file with the layer's (ignored, non-one) gamma in it
    fails the parity: ONNX's BatchNormalization has no fix_gamma. (MXNet's exporter happens to
    write ones too: it runs the graph, and MXNet's operator sets such a gamma to ones.)"""
    net = distbn_net()
    kept = net[1].gamma.data().copy()  # MXNet's operator sets it to ones when it first runs
    files = export(net, tmp_path / "m", (1, 2, 8, 8))
    params = mx.nd.load(str(files[1]))
    gamma = f"arg:{net[1].gamma.name}"
    assert (params[gamma].asnumpy() == 1).all() and (kept.asnumpy() != 1).any()
    x = X.asnumpy()
    assert rel(onnxruntime_run(onnxruntime_env, files[2], x)[0], predict(net)) <= 1e-4
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(files[2]))  # the same file with the layer's gamma in it
    for i, init in enumerate(model.graph.initializer):
        if init.name == net[1].gamma.name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(kept.asnumpy(), init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert rel(onnxruntime_run(onnxruntime_env, tmp_path / "bad.onnx", x)[0], predict(net)) > 1e-3


def test_export_after_update_bn_stats_writes_the_reestimated_statistics(tmp_path):
    net = distbn_net()
    distbn.update_bn_stats(net, [X])
    files = export(net, tmp_path / "m", (1, 2, 8, 8), onnx=False)
    params = mx.nd.load(str(files[1]))
    np.testing.assert_array_equal(params[f"aux:{net[4].running_mean.name}"].asnumpy(),
                                  net[4].running_mean.data().asnumpy())
    batch_mean = net[:4](X).mean(axis=(0, 2, 3)).asnumpy()  # precise BN: the batch's own mean
    np.testing.assert_allclose(params[f"aux:{net[4].running_mean.name}"].asnumpy(), batch_mean,
                               rtol=1e-5)


def test_channels_last_is_refused_for_onnx_in_one_line_and_exported_for_mxnet(tmp_path):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(6, in_units=4, flatten=False), distbn.SyncBatchNorm(6, axis=-1))
    net.initialize()
    with pytest.raises(ExportError, match=r"axis -1 \(channels last\).*onnx=False"):
        export(net, tmp_path / "m", (1, 5, 4))
    assert list(tmp_path.iterdir()) == []  # nothing written half
    x = np.random.RandomState(3).normal(size=(2, 5, 4)).astype(np.float32)
    files = export(net, tmp_path / "m", (1, 5, 4), onnx=False)
    assert rel(without_distbn(files, x), predict(net, mx.nd.array(x))) == 0


def test_bad_input_gets_one_line_and_nothing_written(tmp_path):
    with pytest.raises(ExportError, match="not a HybridBlock"):
        export(gluon.nn.Sequential(), tmp_path / "m", (1, 2))
    deferred = gluon.nn.HybridSequential()
    deferred.add(gluon.nn.Dense(3), distbn.SyncBatchNorm())
    deferred.initialize()
    with pytest.raises(ExportError, match="no value yet.*run it on one batch"):
        export(deferred, tmp_path / "m", (1, 2))
    odd = gluon.nn.HybridSequential()
    odd.add(gluon.nn.Dense(3, in_units=2), distbn.SyncBatchNorm(3),
            gluon.nn.HybridLambda(lambda F, x: F.erfinv(F.tanh(x))))
    odd.initialize()
    with pytest.raises(ExportError, match="ONNX cannot express.*op type erfinv.*onnx=False"):
        export(odd, tmp_path / "m", (1, 2))
    assert list(tmp_path.iterdir()) == []
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(storage.StorageError, match="cannot write"):
        export(distbn_net(), blocked / "m", (1, 2, 8, 8))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_checksums_name_a_damaged_file(tmp_path):
    files = export(distbn_net(), tmp_path / "m", (1, 2, 8, 8))
    assert storage.damaged(files[-1]) is None
    files[1].write_bytes(files[1].read_bytes()[:1000])
    assert storage.damaged(files[-1]) == "m-0000.params differs from its checksum (m.sha256)"
    code = subprocess.run(["sha256sum", "-c", files[-1].name], cwd=tmp_path,
                          capture_output=True).returncode
    assert code != 0  # the file is sha256sum's format


# --- the trainer, the command, serving ------------------------------------------------------

SMOKE = ["-m", "distbn.train", "--config", "configs/smoke.yaml", "--set", "log.progress=false"]


@pytest.mark.multiproc
def test_trainer_exports_and_both_servers_reproduce_its_test_accuracy(tmp_path, onnxruntime_env):
    run_dir = tmp_path / "run"
    horovodrun(2, SMOKE + ["--run-dir", run_dir], env=ENV, timeout=300)
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    export_dir = run_dir / "export"
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "model-0000.params", "model-symbol.json", "model.onnx", "model.sha256"]
    limit = ["--limit", 500, "--data-dir", SHARED_DATA, "--batch-size", 128]  # smoke: 500 test images
    _, out = python(["examples/serve.py", export_dir, "--backend", "mxnet", *limit])
    assert f"mxnet: accuracy {final['test_acc']:.6f} " in out and "modules loaded: mxnet\n" in out, out
    proc = subprocess.run([str(onnxruntime_env), "examples/serve.py", str(export_dir),
                           "--backend", "onnxruntime", *map(str, limit)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert f"onnxruntime: accuracy {final['test_acc']:.6f} " in proc.stdout, proc.stdout + proc.stderr
    assert "none of distbn, horovod, mxnet" in proc.stdout
    # The command makes the same files from the newest checkpoint.
    before = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    python(["-m", "distbn.export", "--run-dir", run_dir])
    assert {p.name: p.read_bytes() for p in export_dir.iterdir()} == before
    # A damaged export file is named by the server, not served.
    (export_dir / "model.onnx").write_bytes(before["model.onnx"][:1000])
    code, out = python(["examples/serve.py", export_dir, *limit], check=False)
    assert code != 0 and out.strip().splitlines()[-1].endswith(
        "model.onnx differs from its checksum in model.sha256"), out


def test_resume_passes_over_a_damaged_checkpoint_saying_so(tmp_path):
    run_dir = tmp_path / "run"
    python(SMOKE + ["--run-dir", run_dir, "--set", "train.epochs=2"], env=ENV, timeout=300)
    params = run_dir / "checkpoints" / "epoch-0002" / "model.params"
    params.write_bytes(params.read_bytes()[:1000])  # the damage
    code, out = python(SMOKE + ["--run-dir", run_dir, "--resume", "--set", "train.epochs=3"],
                       env=ENV, timeout=300)
    assert "epoch-0002 is damaged (model.params differs from its checksum (SHA256SUMS)): " \
           "passed over" in out, out
    assert "resuming after epoch 1 from" in out and "Traceback" not in out, out
    assert [json.loads(r)["epoch"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    code, out = python(["-m", "distbn.export", "--run-dir", tmp_path / "nothing"], check=False)
    assert code == 2 and out.strip() == f"distbn.export: {tmp_path / 'nothing'} is not a run " \
                                        "directory (no config.yaml)", out
