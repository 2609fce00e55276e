"""distbn's C++ library (distbn/native.py): what is compiled where."""
import subprocess

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
    assert native.available()  # the CPU build this machine loads has none of them
    assert "cuda" not in _undefined(native.library_path())


def test_library_links_gloo():
    assert native.available()
    assert "gloo" in _undefined(native.library_path())
