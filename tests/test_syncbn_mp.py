"""SyncBatchNorm under horovodrun on the CPU (Gloo): every case bounded by a timeout."""
import pytest

from conftest import MP, SHARED_DATA, horovodrun, needs_bfloat16, python

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("ndim", [2, 4])
@pytest.mark.parametrize("split", ["equal", "unequal"])
def test_sync_equals_plain_bn_on_the_concatenated_batch(np_, ndim, split):
    sizes = "4,4,4,4" if split == "equal" else "3,5,1,7"
    _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", "--ndim", ndim, "--sizes", sizes,
                              "--steps", 3], timeout=180)
    assert out.count(": OK") == np_, out


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("ndim", [2, 4])
def test_sync_equals_plain_bn_hybridized_with_unequal_batches(np_, ndim):
    _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", "--ndim", ndim, "--sizes", "3,5,1,7",
                              "--steps", 3, "--hybridize"], timeout=180)
    assert out.count("via=gloo hybridized=True: OK") == np_, out


@pytest.mark.parametrize("np_", [2, 3])
def test_sync_with_mxnet_operator_statistics(np_):
    """The graph GPU workers build (statistics and normalization from MXNet's operators, as
    with DISTBN_NATIVE=0) over the same engine. Both modes, unequal batches."""
    for hybridize in ([], ["--hybridize"]):
        _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", "--ndim", 4, "--sizes", "3,5,1",
                                  "--steps", 3, *hybridize], timeout=180, env={"DISTBN_NATIVE": "0"})
        assert out.count("via=gloo hybridized=") == np_ and out.count(": OK") == np_, out


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_half_and_double_input_equal_plain_bn(np_, dtype):
    """float16 data (BN's parameters float32, as Gluon keeps them) and float64 data
    (``net.cast('float64')``): outputs and gradients in the data's type, equal to Gluon's BN
    of the same type on the whole batch (2e-2 and 1e-10 of the largest value)."""
    _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", "--ndim", 4, "--sizes", "3,5,1,7",
                              "--dtype", dtype, "--hybridize"], timeout=180)
    assert out.count(f"dtype={dtype} via=gloo hybridized=True: OK") == np_, out


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_half_and_double_input_with_mxnet_operator_statistics(dtype):
    _, out = horovodrun(2, [MP / "syncbn_equivalence.py", "--ndim", 2, "--sizes", "3,5",
                            "--dtype", dtype, "--hybridize"], timeout=180,
                        env={"DISTBN_NATIVE": "0"})
    assert out.count(f"dtype={dtype} via=gloo hybridized=True: OK") == 2, out


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_local_bn_is_caught_by_the_same_check_in_half_and_double(dtype):
    code, out = horovodrun(2, [MP / "syncbn_equivalence.py", "--ndim", 4, "--dtype", dtype,
                               "--layer", "local"], timeout=180, check=False)
    assert code != 0 and "MISMATCH" in out, out


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("precision", [pytest.param("bfloat16", marks=needs_bfloat16), "float16"])
def test_amp_network_as_close_to_float64_as_gluon_under_amp(np_, precision):
    """MXNet's AMP: bfloat16 by convert_hybrid_block (CPU), float16 by amp.init with loss
    scaling through Horovod's trainer (a BN-only network: no float16 convolutions on CPUs);
    see tests/mp/amp_equivalence.py for how the errors are compared."""
    _, out = horovodrun(np_, [MP / "amp_equivalence.py", "--amp", precision], timeout=240)
    assert out.count(f"layer=sync amp={precision} worst error ratio") == np_, out
    assert out.count(": OK") == np_, out


@pytest.mark.parametrize("precision", [pytest.param("bfloat16", marks=needs_bfloat16), "float16"])
def test_amp_local_bn_is_caught_by_the_same_check(precision):
    code, out = horovodrun(2, [MP / "amp_equivalence.py", "--amp", precision, "--layer", "local"],
                           timeout=240, check=False)
    assert code != 0 and "MISMATCH output" in out and ": OK" not in out, out


def test_size_one_equals_plain_bn_without_collective():
    _, out = python([MP / "syncbn_equivalence.py", "--ndim", 4, "--sizes", 9])
    assert "rank 0/1 sizes=[9] ndim=4 dtype=float32 via=none hybridized=False: OK" in out, out


def test_local_bn_is_caught_by_the_same_check():
    """Negative control: per-worker BN on N > 1 workers must fail the equivalence check."""
    code, out = horovodrun(2, [MP / "syncbn_equivalence.py", "--ndim", 4, "--layer", "local"],
                           timeout=180, check=False)
    assert code != 0 and "MISMATCH" in out, out


def test_process_sets_keep_statistics_within_each_set():
    _, out = horovodrun(4, [MP / "process_sets.py"], timeout=180)
    assert out.count(": OK") == 4, out


@pytest.mark.parametrize("np_", [2, 4])
def test_large_mean_small_spread_over_workers(np_):
    """Synced statistics only: one process runs MXNet's operator (test_layers.py checks the
    synced graph in one process and that one worker's statistics are exactly Gluon's)."""
    _, out = horovodrun(np_, [MP / "stress.py"], timeout=180)
    assert out.count(": OK") == np_, out


# Model-zoo networks, converted and hybridized (oneDNN on), at 2 examples per worker; see
# tests/mp/zoo_equivalence.py for how "equal" is judged. MobileNetV2 takes 64x64 inputs: at
# 28x28 its last layers normalize 1x1 maps of 4-8 values and float32 training diverges from
# float64 within a step (Gluon's own BN alike), leaving nothing to compare.
ZOO = {"resnet18_v1": 28, "mobilenetv2_0.25": 64, "resnet18_v2": 28}


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("arch", list(ZOO))
def test_model_zoo_network_equals_one_process(np_, arch):
    _, out = horovodrun(np_, [MP / "zoo_equivalence.py", "--arch", arch, "--image", ZOO[arch],
                              "--per-worker", 2, "--lr", 0.01], timeout=300)
    assert out.count(": OK") == np_, out


def test_model_zoo_local_bn_is_caught_by_the_same_check():
    code, out = horovodrun(2, [MP / "zoo_equivalence.py", "--arch", "resnet18_v1", "--per-worker",
                               2, "--lr", 0.01, "--layer", "gluon"], timeout=300, check=False)
    assert code != 0 and "MISMATCH" in out and ": OK" not in out, out


# Numpy mode and channels last: the same graph, the same proof (outputs, input and parameter
# gradients, running statistics, prediction against Gluon's BN on the whole batch).
LAYOUTS = {"numpy": ["--ndim", 4, "--numpy"], "numpy-2d": ["--ndim", 2, "--numpy"],
           "nhwc": ["--ndim", 4, "--axis", -1], "nwc": ["--ndim", 3, "--axis", -1],
           "numpy-nhwc": ["--ndim", 4, "--axis", -1, "--numpy"]}


# Each layout at 2 and 4 workers, hybridized; numpy mode and NHWC imperatively as well (the
# one-process tests run every axis and mode both ways).
LAYOUT_CASES = [(layout, True, n) for layout in LAYOUTS for n in (2, 4) if layout != "numpy-2d"]
LAYOUT_CASES += [("numpy-2d", True, 2), ("numpy", False, 2), ("numpy", False, 4), ("nhwc", False, 2)]


@pytest.mark.parametrize("layout, hybridize, np_", LAYOUT_CASES)
def test_numpy_mode_and_channels_last_equal_plain_bn(layout, hybridize, np_):
    _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", *LAYOUTS[layout], "--sizes", "3,5,1,7"]
                        + (["--hybridize"] if hybridize else []), timeout=180)
    assert out.count(": OK") == np_, out


def test_numpy_channels_last_with_mxnet_operator_statistics():
    _, out = horovodrun(2, [MP / "syncbn_equivalence.py", *LAYOUTS["numpy-nhwc"], "--sizes", "3,5",
                            "--hybridize"], env={"DISTBN_NATIVE": "0"}, timeout=180)
    assert out.count(": OK") == 2, out


@pytest.mark.parametrize("layout", ["numpy", "nhwc"])
def test_numpy_and_channels_last_local_bn_is_caught(layout):
    code, out = horovodrun(2, [MP / "syncbn_equivalence.py", *LAYOUTS[layout], "--layer", "local"],
                           timeout=180, check=False)
    assert code != 0 and "MISMATCH" in out, out


def test_model_zoo_network_in_numpy_mode_equals_one_process():
    _, out = horovodrun(2, [MP / "zoo_equivalence.py", "--numpy", "--per-worker", 2, "--lr", 0.01],
                        timeout=300)
    assert out.count("resnet18_v1 numpy sync") == 2 and out.count(": OK") == 2, out


def test_books_numpy_lenet_trains_with_sync_bn():
    _, out = horovodrun(2, [MP / "book_numpy.py"], env={"DISTBN_DATA_DIR": str(SHARED_DATA)},
                        timeout=300)
    assert out.count("numpy LeNet") == 2 and out.count(": OK") == 2, out


# Empty per-worker batches (numpy mode, where a 0-size batch exists), with PyTorch's rules:
# the empty worker takes part in both exchanges, gets an empty output and zero gradients; the
# statistics are the examples'; a global batch of none leaves the running statistics alone.
EMPTY = {"one-of-two": (2, "3,0"), "two-of-four": (4, "3,0,5,0"), "first-of-two-nhwc": (2, "0,4"),
         "every-worker": (2, "0,0"), "every-worker-of-four": (4, "0,0,0,0"),
         "one-of-two-hybridized": (2, "3,0"), "every-worker-hybridized": (2, "0,0")}


@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_batches_follow_pytorchs_rules(case):
    np_, sizes = EMPTY[case]
    args = ["--numpy", "--sizes", sizes, "--ndim", 2 if np_ == 4 else 4]
    args += ["--axis", -1] if "nhwc" in case else []
    args += ["--hybridize"] if "hybridized" in case else []
    _, out = horovodrun(np_, [MP / "syncbn_equivalence.py", *args], timeout=180)
    assert out.count(": OK") == np_, out


def test_empty_batch_with_local_bn_is_caught():
    code, out = horovodrun(4, [MP / "syncbn_equivalence.py", "--numpy", "--sizes", "3,0,5,0",
                               "--ndim", 2, "--layer", "local"], timeout=180, check=False)
    assert code != 0 and "MISMATCH" in out, out


# --- several devices per process (CPU devices mx.cpu(0), mx.cpu(1)) -------------------------
# MXNet's CPU devices share one pool of temporary space (MXNET_CPU_TEMP_COPY, default 4): with
# so few copies the devices' exchange cannot meet (see test_too_few_cpu_temp_copies_stop_...).
DEVICES_ENV = {"MXNET_CPU_TEMP_COPY": "64", "DISTBN_DEVICE_TIMEOUT": "60"}
DEVICE_MODES = {"imperative": [], "hybridized": ["--hybridize"],
                "threads": ["--loop", "threads", "--hybridize"],
                "numpy": ["--numpy", "--hybridize"], "nhwc": ["--axis", "-1"],
                "dense": ["--ndim", "2"]}


@pytest.mark.parametrize("mode", list(DEVICE_MODES))
def test_two_devices_of_one_process_equal_plain_bn_on_the_whole_batch(mode):
    """One process, two devices with uneven batches (1 and 5 examples): outputs, input
    gradients, gamma/beta gradients summed over the devices, every device's running
    statistics and prediction equal Gluon's BN on the concatenated batch, over 3 SGD steps."""
    _, out = python([MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "1,5",
                     *DEVICE_MODES[mode]], timeout=300, env=DEVICES_ENV)
    assert "devices=[1, 5]" in out and out.count(": OK") == 1, out


@pytest.mark.parametrize("mode", ["imperative", "hybridized", "threads"])
def test_two_workers_of_two_devices_equal_plain_bn_on_the_whole_batch(mode):
    _, out = horovodrun(2, [MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "3,1,2,2",
                            *DEVICE_MODES[mode]], timeout=300, env=DEVICES_ENV)
    assert out.count("via=gloo") == 2 and out.count(": OK") == 2, out


@pytest.mark.parametrize("control", [["--layer", "local"], ["--layer", "contrib"]])
def test_per_device_statistics_fail_the_same_check(control):
    """Negative controls: distbn.BatchNorm (each device its own statistics, what SyncBatchNorm
    did before), and contrib's SyncBatchNorm, which averages the devices' means (wrong with
    uneven device batches; with even ones it passes: the next test)."""
    code, out = python([MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "1,5", *control],
                       timeout=300, env=DEVICES_ENV, check=False)
    assert code != 0 and "MISMATCH step 1 output" in out and ": OK" not in out, out


def test_contrib_passes_the_check_with_even_device_batches():
    _, out = python([MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "3,3", "--layer",
                     "contrib"], timeout=300, env=DEVICES_ENV)
    assert out.count(": OK") == 1, out


@pytest.mark.parametrize("control", [["--layer", "local"], ["--trainer", "horovod"]])
def test_two_workers_of_two_devices_negative_controls(control):
    """horovod.mxnet's own trainer all-reduces the first device's gradients only: the devices
    drift apart from the second step (distbn's trainer sums the devices' gradients first)."""
    code, out = horovodrun(2, [MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "3,1,2,2",
                               "--hybridize", *control], timeout=300, env=DEVICES_ENV, check=False)
    assert code != 0 and "MISMATCH" in out and ": OK" not in out, out


# GluonCV's recipe for sync BN: a segmentation network (FCN-like: dilated stage, FCN head,
# bilinear upsampling, per-pixel loss) built with norm_layer/norm_kwargs, against Gluon's BN in
# float64 on the whole batch; it needs more temporary-space copies than the small nets above.
SEGMENTATION_ENV = {"MXNET_CPU_TEMP_COPY": "256", "DISTBN_DEVICE_TIMEOUT": "60"}


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_gluoncv_style_segmentation_at_two_workers_of_two_devices_equals_float64(hybridize):
    _, out = horovodrun(2, [MP / "segmentation_equivalence.py", "--devices", 2, "--sizes", "3,1,2,2",
                            *(["--hybridize"] if hybridize else [])],
                        timeout=300, env=SEGMENTATION_ENV)
    assert out.count(": OK") == 2 and "MISMATCH" not in out, out


def test_gluoncv_style_segmentation_with_per_device_bn_fails_the_same_check():
    code, out = horovodrun(2, [MP / "segmentation_equivalence.py", "--devices", 2, "--sizes",
                               "3,1,2,2", "--layer", "local"], timeout=300, env=SEGMENTATION_ENV,
                           check=False)
    assert code != 0 and out.count("MISMATCH input gradient, output, parameter gradient, "
                                   "running statistics") == 2 and ": OK" not in out, out


def test_too_few_cpu_temp_copies_stop_with_one_message_instead_of_hanging():
    code, out = python([MP / "syncbn_equivalence.py", "--devices", 2, "--sizes", "1,5"],
                       timeout=120, env={"MXNET_CPU_TEMP_COPY": "4", "DISTBN_DEVICE_TIMEOUT": "5"},
                       check=False)
    assert code != 0 and "waited 5 s for device(s) 1" in out and "MXNET_CPU_TEMP_COPY" in out, out
