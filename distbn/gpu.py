"""Which GPUs MXNet 1.9.1's CUDA wheel can run, checked once per device before its first step.

``mxnet-cu112==1.9.1`` carries machine code (cubins) for compute capabilities 5.0, 6.0, 7.0,
8.0 and 8.6, and no PTX that a newer driver could compile for a newer GPU (MXNet's
config/distribution/linux_cu112.cmake at 1.9.1). A cubin for X.Y runs on X.Z with Z >= Y, so
Maxwell (5.x) through Ampere and Ada (8.x) run it; Hopper (9.0: H100, H200), Blackwell and
Kepler (3.x) do not, and there the first kernel fails inside a training step with "no kernel
image is available for execution on the device". The trainer (and ``--check``) and distbn's
layers ask this module first and stop with one line instead.

Never executed on a GPU (none here): the tests give the capability themselves.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Tuple

# (major, minor) of every cubin in the wheel (tests/gpu_install/check.sh compares this with
# cuobjdump's listing of the installed libmxnet.so); a device runs the wheel when one has its
# major and a minor no greater than the device's.
WHEEL_ARCHITECTURES = ((5, 0), (6, 0), (7, 0), (8, 0), (8, 6))
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75  # cuda.h's CUdevice_attribute
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_checked: dict = {}  # device id -> the refusal (None: runs)


class UnsupportedGPU(RuntimeError):
    """A GPU that MXNet 1.9.1's CUDA wheel has no code for."""


def runs(capability: Tuple[int, int]) -> bool:
    major, minor = capability
    return any(m == major and n <= minor for m, n in WHEEL_ARCHITECTURES)


def unsupported(name: str, capability: Tuple[int, int]) -> Optional[str]:
    """Why the GPU ``name`` of compute ``capability`` cannot run the wheel, or None."""
    if runs(capability):
        return None
    built = ", ".join(f"{m}.{n}" for m, n in WHEEL_ARCHITECTURES)
    return (f"GPU {name} has compute capability {capability[0]}.{capability[1]}, which "
            f"mxnet-cu112 1.9.1 has no code for: it is built for {built} (no PTX), so it runs "
            f"on compute capabilities 5.x to 8.x only (Maxwell to Ampere and Ada, not Hopper "
            f"or newer); train on the CPU (CUDA_VISIBLE_DEVICES=) or on such a GPU")


def describe(device_id: int) -> Tuple[str, Tuple[int, int]]:
    """(name, (major, minor)) of a device, from the driver (libcuda, the library MXNet uses)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    calls = [lambda: cuda.cuInit(0), lambda: cuda.cuDeviceGet(ctypes.byref(dev), device_id),
             lambda: cuda.cuDeviceGetName(name, len(name), dev),
             lambda: cuda.cuDeviceGetAttribute(
                 ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
             lambda: cuda.cuDeviceGetAttribute(
                 ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)]
    for call in calls:
        code = call()
        if code != 0:
            raise RuntimeError(f"CUDA driver error {code} while describing GPU {device_id}")
    return name.value.decode(errors="replace"), (major.value, minor.value)


def check(ctx) -> None:
    """Raise UnsupportedGPU when ``ctx`` is a GPU the wheel cannot run; CPU contexts pass.
    The driver is asked once per device."""
    if ctx.device_type != "gpu":
        return
    if ctx.device_id not in _checked:
        _checked[ctx.device_id] = unsupported(*describe(ctx.device_id))
    if _checked[ctx.device_id]:
        raise UnsupportedGPU(_checked[ctx.device_id])
