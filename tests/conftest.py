"""Shared helpers: paths, and a bounded `horovodrun` launcher for multi-process tests."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Several CPU devices in this process (test_devices.py) need more of MXNet's shared temporary
# space than its default 4 copies (docs/layer.md, several devices). MXNet sizes the pool when an
# operator first asks for it, so the variable is set for that first operator only: the
# processes the tests start see the environment as it was (they set their own, or prove that
# the trainer does).
_TEMP_COPIES = os.environ.get("MXNET_CPU_TEMP_COPY")
os.environ["MXNET_CPU_TEMP_COPY"] = "256"
import mxnet as _mx  # noqa: E402
_mx.nd.ones((2, 2)).sum().wait_to_read()  # a reduction: it takes temporary space
if _TEMP_COPIES is None:
    del os.environ["MXNET_CPU_TEMP_COPY"]
else:
    os.environ["MXNET_CPU_TEMP_COPY"] = _TEMP_COPIES

from distbn import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MP = ROOT / "tests" / "mp"
SHARED_DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
BIN = Path(sys.executable).parent
HOROVODRUN = BIN / "horovodrun"

# bfloat16 follows the hardware (distbn.hardware's probe asks oneDNN): its tests run where
# the CPU can, and are skipped with the probe's reason where it cannot (an AVX2-only CPU).
BFLOAT16_WHY = hardware.bfloat16_unsupported()
needs_bfloat16 = pytest.mark.skipif(BFLOAT16_WHY is not None,
                                    reason=f"bfloat16 cannot run here: {BFLOAT16_WHY}")
# oneDNN as on a CPU without AVX-512 (it reads this when it starts), for the refusals' tests.
NO_AVX512 = {"DNNL_MAX_CPU_ISA": "AVX2"}


def horovodrun(np_, args, timeout=180, env=None, check=True):
    """Run ``horovodrun -np N python -W ignore ARGS`` on local slots with a hard timeout.

    A mismatched collective hangs silently, so every run is bounded: on timeout the whole
    process group (launcher and workers) is killed and the test fails with the output so far.
    """
    cmd = [str(HOROVODRUN), "-np", str(np_), "-H", f"localhost:{np_}",
           sys.executable, "-W", "ignore", *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return proc.returncode, out


def python(args, timeout=180, env=None, check=True):
    """Run one plain ``python`` process (the size-1 path), bounded like horovodrun."""
    proc = subprocess.run([sys.executable, "-W", "ignore", *map(str, args)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {args}\n{out[-6000:]}")
    return proc.returncode, out


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the Fashion-MNIST copy is missing at {SHARED_DATA}")
    return SHARED_DATA
