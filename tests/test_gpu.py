"""distbn.gpu: which GPUs MXNet 1.9.1's CUDA wheel runs, and the trainer's and the layers' refusal
of the others. No GPU here: each test gives the device's name and compute capability itself
(``distbn.gpu.describe`` replaced), and the trainer sees one GPU (``num_gpus`` replaced)."""
import mxnet as mx
import pytest

from conftest import SHARED_DATA, python
from distbn import gpu

HOPPER = ("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize("capability,runs", [
    ((5, 0), True), ((5, 2), True), ((6, 1), True), ((7, 0), True), ((7, 5), True),
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # Ada runs the 8.6 cubins
    ((3, 7), False), ((9, 0), False), ((10, 0), False), ((12, 0), False)])
def test_a_gpu_runs_the_wheel_when_a_cubin_has_its_major_and_no_greater_minor(capability, runs):
    assert gpu.runs(capability) is runs
    assert (gpu.unsupported("GPU", capability) is None) is runs


def test_the_refusal_names_the_gpu_its_capability_and_what_the_wheel_has():
    why = gpu.unsupported(*HOPPER)
    assert why.startswith("GPU NVIDIA H100 80GB HBM3 has compute capability 9.0, which "
                          "mxnet-cu112 1.9.1 has no code for: it is built for 5.0, 6.0, 7.0, "
                          "8.0, 8.6 (no PTX)"), why
    assert "\n" not in why


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine whose every GPU is the one the test names (nothing asked of it yet); the
    driver is never asked."""
    def use(name, capability):
        monkeypatch.setattr(gpu, "_checked", {})
        monkeypatch.setattr(gpu, "describe", lambda device_id: (name, capability))
    return use


def test_check_passes_cpus_and_supported_gpus_and_raises_for_others(fake_gpu, monkeypatch):
    fake_gpu("NVIDIA A100-SXM4-40GB", (8, 0))
    gpu.check(mx.cpu())
    gpu.check(mx.gpu(0))
    monkeypatch.setattr(gpu, "describe", lambda device_id: HOPPER)
    gpu.check(mx.gpu(0))  # device 0 was asked already: its answer is kept
    with pytest.raises(gpu.UnsupportedGPU, match="compute capability 9.0"):
        gpu.check(mx.gpu(1))


@pytest.mark.parametrize("cls", ["BatchNorm", "SyncBatchNorm"])
def test_a_layer_on_an_unsupported_gpu_refuses_before_any_kernel(fake_gpu, cls):
    """Parameters deferred to GPU 0 (no channels given: nothing is allocated, so this runs
    without a GPU); an imperative call and a graph being built (a hybridized network's first
    call) both stop at the check. A CPU array reaches no GPU kernel either way."""
    import distbn
    fake_gpu(*HOPPER)
    layer = getattr(distbn, cls)()
    layer.initialize(ctx=mx.gpu(0))
    with pytest.raises(gpu.UnsupportedGPU, match="H100"):
        layer(mx.nd.ones((2, 3)))
    with pytest.raises(gpu.UnsupportedGPU, match="H100"):
        layer(mx.sym.var("data"))
    fake_gpu("NVIDIA A100-SXM4-40GB", (8, 0))
    assert isinstance(layer(mx.sym.var("data")), mx.sym.Symbol)
    cpu_layer = getattr(distbn, cls)()
    cpu_layer.initialize()
    fake_gpu(*HOPPER)
    assert cpu_layer(mx.nd.ones((2, 3))).shape == (2, 3)


# The trainer in a process of its own that sees one GPU of the given kind.
TRAIN_ON_FAKE_GPU = """
import sys
import mxnet as mx
from distbn import gpu, train
mx.context.num_gpus = lambda: 1
gpu.describe = lambda device_id: ({name!r}, {capability!r})
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["--check", "run"])
def test_the_trainer_on_an_unsupported_gpu_stops_with_one_line(tmp_path, how):
    run_dir = tmp_path / "run"
    args = ["-c", TRAIN_ON_FAKE_GPU.format(name=HOPPER[0], capability=HOPPER[1]),
            "--config", "configs/smoke.yaml", "--run-dir", str(run_dir)]
    code, out = python(args + (["--check"] if how == "--check" else []),
                       env={"DISTBN_DATA_DIR": str(SHARED_DATA)}, check=False)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, out
    assert lines[0].startswith("distbn.train: error: GPU NVIDIA H100 80GB HBM3 has compute "
                               "capability 9.0, which mxnet-cu112 1.9.1 has no code for"), out
    assert not run_dir.exists()
