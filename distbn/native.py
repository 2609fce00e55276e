"""distbn's C++ operators (``csrc/``): the batch-norm math for the CPU (``batch_norm.cc``) and
the sync layers' all-reduce on Gloo (``allreduce.cc``, connected by :mod:`distbn.engine`; CPU,
and GPU where MXNet is a CUDA build). Built once with the system's C++ compiler against the
installed MXNet and Gloo, cached, and loaded through MXNet's extension API, after which
``F.distbn_bn_stats``, ``F.distbn_bn_apply`` and ``F.distbn_allreduce`` exist for both ``mx.nd``
and ``mx.sym`` (so inside hybridized graphs); :func:`clib` reaches the library's C functions.
``launch/install.sh`` builds them; otherwise the first use does (a few seconds).

The batch-norm kernels are CPU-only: on machines with GPUs, or with ``DISTBN_NATIVE=0``,
:func:`kernels` is False and the layers build the same graph from MXNet's own operators
(:mod:`distbn.stats`), which computes the same values, more slowly on the CPU.
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
# Gloo (Debian's libgloo-dev: headers in /usr/include/gloo, libgloo.so), the collective library of
# the sync layers' all-reduce (allreduce.cc).
LIBS = ["-lgloo"]
_loaded: dict = {}  # "ok" -> whether the library is loaded (a failure is warned once)


def _mxnet_dir() -> Path:
    import mxnet
    return Path(mxnet.__file__).resolve().parent


def pypi_cuda() -> list:
    """The folders of PyPI's CUDA 11.8 wheels, or [] without them: ``nvidia-cuda-runtime-cu11``
    (cuda_runtime_api.h, libcudart) and ``nvidia-cuda-nvcc-cu11`` (the crt/ headers it includes)."""
    try:
        import nvidia.cuda_nvcc
        import nvidia.cuda_runtime
    except ImportError:
        return []
    return [list(m.__path__)[0] for m in (nvidia.cuda_runtime, nvidia.cuda_nvcc)]


def cuda_flags(installs=None) -> list:
    """Flags that compile the all-reduce's GPU lines (``DISTBN_CUDA``: staging through host
    memory) against the first CUDA 11 install of ``installs`` (each a list of folders with
    ``include/`` and ``lib*/``) that has the runtime's header and library; by default PyPI's
    wheels (:func:`pypi_cuda`, what launch/install.sh gives mxnet-cu112), then ``CUDA_HOME``
    and ``/usr/local/cuda``. MXNet loads CUDA 11's runtime (``libcudart.so.11.0``): a CUDA 12
    or 13 toolkit there (this machine's /usr/local/cuda is 13) is passed over. Raises when
    none has it."""
    if installs is None:
        installs = [pypi_cuda(), [os.environ.get("CUDA_HOME", "")], ["/usr/local/cuda"]]
    for folders in installs:
        dirs = [Path(f) for f in folders if f]
        incs = [d / "include" for d in dirs if (d / "include").is_dir()]
        libs = [lib for d in dirs for lib in (d / "lib64", d / "lib") if lib.is_dir()]
        runtime = [r for lib in libs for r in sorted(lib.glob("libcudart.so.11*"))]
        if any((i / "cuda_runtime_api.h").is_file() for i in incs) and runtime:
            lib = runtime[0].parent
            return ["-DDISTBN_CUDA", *(f"-I{i}" for i in incs), f"-L{lib}", f"-Wl,-rpath,{lib}",
                    f"-l:{runtime[0].name}"]
    raise RuntimeError("MXNet is a CUDA build but no CUDA 11 runtime was found: install "
                       "launch/cuda11.txt (launch/install.sh does) or set CUDA_HOME to a "
                       "CUDA 11 toolkit")


def _device_flags() -> list:
    import mxnet as mx
    return cuda_flags() if mx.runtime.Features().is_enabled("CUDA") else []


def library_path() -> Path:
    """Where the built library lives: the user cache, under a name that changes with the
    source, the MXNet build and the Python version (a stale build is never loaded)."""
    import mxnet
    code = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS])
    key = hashlib.sha256(code + f"{mxnet.__version__} {_mxnet_dir()} "
                         f"{sys.version_info[:2]} {FLAGS} {LIBS} {_device_flags()}".encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distbn" / "ops" / key / "libdistbn_ops.so"


def build(dest: Path, extra: list = None) -> Path:
    """Compile the operator library to ``dest`` (temporary file, then rename: workers that
    build at the same time never load a half-written file); ``extra`` flags default to the
    device's (:func:`cuda_flags` on a CUDA build of MXNet)."""
    mx_dir = _mxnet_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest.parent)
    os.close(fd)
    cmd = [os.environ.get("CXX", "g++"), *FLAGS, f"-I{mx_dir / 'include'}", *map(str, SOURCES),
           str(mx_dir / "src" / "lib_api.cc"), *LIBS,
           *(_device_flags() if extra is None else extra), "-o", tmp]
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
    path = library_path()
    if not path.is_file():
        build(path)
    _load_keeping_functions(path)
    _loaded["path"] = path


def _load_keeping_functions(path: Path) -> None:
    """``mx.library.load``, which makes every operator function of ``mx.nd`` and ``mx.sym``
    anew, with the functions that existed before put back. MXNet's ``amp.init()`` replaces
    them with wrappers that cast to float16 or float32; a library loaded after it (when the
    first distbn layer is built) would undo that silently and train in float32."""
    import types
    import mxnet as mx
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and name.startswith(("mxnet.ndarray", "mxnet.symbol"))]
    before = [(m, {k: v for k, v in vars(m).items() if isinstance(v, types.FunctionType)})
              for m in modules]
    mx.library.load(str(path), verbose=False)
    for module, functions in before:
        for name, fn in functions.items():
            setattr(module, name, fn)


def clib():
    """The loaded library for ctypes (the same copy MXNet loaded: dlopen shares it)."""
    import ctypes
    if not available():
        raise RuntimeError("distbn's C++ operators are not loaded")
    if "clib" not in _loaded:
        _loaded["clib"] = ctypes.CDLL(str(_loaded["path"]))
    return _loaded["clib"]


def available() -> bool:
    """Whether the C++ library is loaded; loads it on first call. False when it cannot be
    built (said once): then the layers' own statistics use MXNet's operators and several
    workers cannot sync."""
    if "ok" not in _loaded:
        try:
            load()
            _loaded["ok"] = True
        except Exception as e:  # no compiler, no Gloo headers
            print(f"distbn: warning: distbn's C++ operators unavailable: {e}", file=sys.stderr)
            _loaded["ok"] = False
    return _loaded["ok"]


def kernels() -> bool:
    """Whether the layers use the C++ batch-norm kernels (CPU only): not with
    ``DISTBN_NATIVE=0`` nor on a machine with GPUs, whose layers build the same graph from
    MXNet's operators (:mod:`distbn.stats`)."""
    import mxnet as mx
    return (available() and os.environ.get("DISTBN_NATIVE", "1") != "0"
            and mx.context.num_gpus() == 0)
