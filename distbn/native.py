"""distbn's C++ operators for the CPU (``csrc/``): the batch-norm math (``batch_norm.cc``) and
the sync layer's all-reduce over a mesh of sockets (``allreduce.cc``, set up by
:mod:`distbn.mesh`). Built once with the system's C++ compiler against the installed MXNet,
cached, and loaded through MXNet's extension API, after which ``F.distbn_bn_stats``,
``F.distbn_bn_apply`` and ``F.distbn_allreduce`` exist for both ``mx.nd`` and ``mx.sym`` (so
inside hybridized graphs); :func:`clib` reaches the library's C functions.
``launch/install.sh`` builds them; otherwise the first use does (a few seconds).

Where they cannot be had (no compiler, ``DISTBN_NATIVE=0``, or a machine with GPUs, for which
there is no CUDA kernel), :func:`available` is False and the layers build the same graph from
MXNet's own operators (:mod:`distbn.stats`), which computes the same values, more slowly.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("batch_norm.cc", "allreduce.cc")]
HEADERS = sorted(CSRC.glob("*.h"))  # included by the sources: part of the build key
# -Bsymbolic: the library binds to its own copies of lib_api.h's inline functions; loaded next
# to Horovod's MXNet extension it otherwise picked up foreign ones and crashed. -fopenmp: the
# system's libgomp, the OpenMP runtime MXNet itself links.
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wl,-Bsymbolic"]
_loaded: dict = {}  # "ok" -> whether the library is loaded (a failure is warned once)


def _mxnet_dir() -> Path:
    import mxnet
    return Path(mxnet.__file__).resolve().parent


def library_path() -> Path:
    """Where the built library lives: the user cache, under a name that changes with the
    source, the MXNet build and the Python version (a stale build is never loaded)."""
    import mxnet
    code = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS])
    key = hashlib.sha256(code + f"{mxnet.__version__} {_mxnet_dir()} "
                         f"{sys.version_info[:2]} {FLAGS}".encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distbn" / "ops" / key / "libdistbn_ops.so"


def build(dest: Path) -> Path:
    """Compile the operator library to ``dest`` (temporary file, then rename: workers that
    build at the same time never load a half-written file)."""
    mx_dir = _mxnet_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest.parent)
    os.close(fd)
    cmd = [os.environ.get("CXX", "g++"), *FLAGS, f"-I{mx_dir / 'include'}", *map(str, SOURCES),
           str(mx_dir / "src" / "lib_api.cc"), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def load() -> None:
    """Build if needed and load the library; raises on failure."""
    import mxnet as mx
    path = library_path()
    if not path.is_file():
        build(path)
    mx.library.load(str(path), verbose=False)
    _loaded["path"] = path


def clib():
    """The loaded library for ctypes (the same copy MXNet loaded: dlopen shares it)."""
    import ctypes
    if not available():
        raise RuntimeError("distbn's C++ operators are not loaded")
    if "clib" not in _loaded:
        _loaded["clib"] = ctypes.CDLL(str(_loaded["path"]))
    return _loaded["clib"]


def available() -> bool:
    """Whether the C++ operators are loaded; loads them on first call. False with
    ``DISTBN_NATIVE=0``, on machines with GPUs, or when they cannot be built (said once)."""
    if "ok" not in _loaded:
        import mxnet as mx
        if os.environ.get("DISTBN_NATIVE", "1") == "0" or mx.context.num_gpus() > 0:
            _loaded["ok"] = False
        else:
            try:
                load()
                _loaded["ok"] = True
            except Exception as e:  # no compiler, no headers: the MXNet-ops graph still works
                print(f"distbn: warning: native batch norm unavailable, using MXNet ops "
                      f"(slower): {e}", file=sys.stderr)
                _loaded["ok"] = False
    return _loaded["ok"]
