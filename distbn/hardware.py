"""What this machine's MXNet can run: the CPU's flags, and whether bfloat16 works on it.

bfloat16 on the CPU is oneDNN's: MXNet 1.9.1 has no other bfloat16 convolution or batch norm.
oneDNN picks its kernels by the CPU's instruction set when an operator first runs, and has
bfloat16 convolutions only from AVX-512 on; on an AVX2-only CPU (an AMD EPYC of this project's
machines) every bfloat16 network fails at its first step with "could not create a primitive
descriptor iterator". A list of flags would guess at oneDNN's rule (and miss
``DNNL_MAX_CPU_ISA``, which caps the instruction set oneDNN uses); so the probe asks oneDNN
itself: a 1x1 bfloat16 convolution and batch norm on a 3x3 image (~10 ms, once per process).
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Optional


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_simd(flags: set) -> str:
    """The widest vector extension among ``flags``, for messages."""
    for name in ("avx512_bf16", "avx512f", "avx2", "avx", "sse4_2"):
        if name in flags:
            return name
    return "none known"


@functools.lru_cache(maxsize=None)
def bfloat16_unsupported() -> Optional[str]:
    """Why bfloat16 cannot run on this machine's CPU, or None when it can (cached)."""
    import mxnet as mx
    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return "MXNet was built without oneDNN, which holds its only bfloat16 CPU kernels"
    if _probe():
        return None
    flags = cpu_flags()
    capped = os.environ.get("DNNL_MAX_CPU_ISA") or os.environ.get("MKLDNN_MAX_CPU_ISA")
    has = f"this CPU: {best_simd(flags)}" + ("" if "avx512f" in flags else ", no avx512f")
    if capped:
        has += f"; oneDNN capped at DNNL_MAX_CPU_ISA={capped}"
    return f"MXNet's oneDNN has no bfloat16 convolution on this CPU, it needs AVX-512 ({has})"


def _probe() -> bool:
    """Whether oneDNN runs a bfloat16 convolution and batch norm here. MXNet logs oneDNN's
    refusal to stderr before raising it; the log goes to a scratch file instead (the caller
    prints one line of its own). The engine survives a refused operator (checked here)."""
    import mxnet as mx
    from mxnet.contrib.amp.amp import bfloat16
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            x = mx.nd.amp_cast(mx.nd.ones((1, 1, 3, 3)), dtype=bfloat16)
            w = mx.nd.amp_cast(mx.nd.ones((1, 1, 1, 1)), dtype=bfloat16)
            y = mx.nd.Convolution(x, w, kernel=(1, 1), num_filter=1, no_bias=True)
            one, zero = mx.nd.ones((1,)), mx.nd.zeros((1,))
            mx.nd.BatchNorm(y, one, zero, zero, one).wait_to_read()
            return True
        except mx.base.MXNetError:
            return False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
