"""distbn's C++ library (distbn/native.py): what is compiled where."""
import subprocess
import sys

import pytest

from distbn import native


def _undefined(lib) -> str:
    return subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                          text=True, check=True).stdout


def test_gpu_lines_compile_and_link_against_the_cuda_runtime(tmp_path):
    """The all-reduce's GPU staging (``DISTBN_CUDA`` in csrc/allreduce.cc) compiles and links
    here against CUDA's runtime headers from PyPI; it has never run (no GPU on this machine)."""
    wheels = native.pypi_cuda()  # CUDA 11.8's, the family of mxnet-cu112
    assert wheels, "nvidia-cuda-runtime-cu11 / nvidia-cuda-nvcc-cu11 (the dev extra) are missing"
    lib = native.build(tmp_path / "libdistbn_gpu.so", extra=native.cuda_flags([wheels]))
    for symbol in ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemsetAsync"):
        assert symbol in _undefined(lib)
    # The build this machine loads has them exactly when MXNet is its CUDA wheel (the GPU
    # install: tests/gpu_install/check.sh); the CPU wheel's build has no CUDA at all.
    import mxnet as mx
    assert native.available()
    loaded = _undefined(native.library_path())
    if mx.runtime.Features().is_enabled("CUDA"):
        assert "cudaMemcpyAsync" in loaded
    else:
        assert "cuda" not in loaded


def test_library_links_gloo():
    assert native.available()
    assert "gloo" in _undefined(native.library_path())


AMP_THEN_LOAD = """
import sys
import mxnet as mx
from mxnet.contrib import amp
from distbn import native
amp.init(target_dtype="float16")
wrapped = mx.sym.FullyConnected
if sys.argv[1] == "distbn":
    native.load()
else:  # MXNet's own loader, which makes the operator functions anew
    mx.library.load(str(native.library_path()), verbose=False)
x = mx.sym.var("x")
graph = mx.sym.FullyConnected(x, num_hidden=2).tojson(remove_amp_cast=False)
print("kept" if mx.sym.FullyConnected is wrapped and "amp_cast" in graph else "lost")
"""


@pytest.mark.parametrize("loader, want", [("distbn", "kept"), ("mxnet", "lost")])
def test_loading_the_library_keeps_amp_init_wrappers(loader, want):
    """amp.init() wraps MXNet's operator functions (casts to float16); distbn loads its library
    when the first layer is built, usually after amp.init(). MXNet's loader alone (the
    control) replaces the wrappers and the network would silently train in float32."""
    native.available()  # built once, before the child processes load it
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", AMP_THEN_LOAD, loader],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == want, proc.stdout + proc.stderr[-3000:]
