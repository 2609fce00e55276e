"""The trainer's ``train.precision``: float32, or MXNet's AMP in bfloat16 (CPUs) or float16 (GPUs).

Both AMP precisions use ``amp.init()``, called before the network is built: MXNet's operator
functions then cast to the low precision for the operators AMP lists (convolutions, dense
layers) and to float32 for the others that need it, in imperative calls and in hybridized
graphs alike. The network, its parameters (float32), its checkpoints and the BN layers' statistics
(float32 between two casts, summed in float64: distbn.layers) stay as in a float32 run, so a
checkpoint resumes in any precision. float16 also needs loss scaling (its range ends at 65504;
bfloat16 has float32's): ``amp.init_trainer`` and ``amp.scale_loss``.

Where each can run (checked before anything is built, with a one-line error otherwise):
bfloat16 on CPUs with oneDNN (MXNet's CPU build) and AVX-512 (oneDNN's bfloat16 kernels);
float16 on GPUs (MXNet has no float16 convolution on the CPU).
"""
from __future__ import annotations

from contextlib import contextmanager

from .config import ConfigError


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


def unsupported(precision: str, on_gpu: bool, mkldnn: bool, flags: set):
    """Why ``precision`` cannot train here, or None."""
    if precision == "float16" and not on_gpu:
        return ("train.precision float16 trains on GPUs only (MXNet has no float16 convolution "
                "on the CPU); on CPUs use bfloat16")
    if precision == "bfloat16" and on_gpu:
        return "train.precision bfloat16 is MXNet's CPU mixed precision; on GPUs use float16"
    if precision == "bfloat16" and not (mkldnn and "avx512f" in flags):
        return ("train.precision bfloat16 needs MXNet with oneDNN and a CPU with AVX-512 "
                f"(oneDNN: {'yes' if mkldnn else 'no'}, avx512f: "
                f"{'yes' if 'avx512f' in flags else 'no'})")
    return None


def check(precision: str, ctx) -> None:
    """Raises ConfigError when ``precision`` cannot train on ``ctx``."""
    import mxnet as mx
    why = unsupported(precision, ctx.device_type == "gpu",
                      mx.runtime.Features().is_enabled("MKLDNN"), cpu_flags())
    if why:
        raise ConfigError(why)


def start(precision: str) -> None:
    """``amp.init`` for the AMP precisions; must come before the network is built."""
    if precision != "float32":
        from mxnet.contrib import amp
        amp.init(target_dtype=precision)


def prepare_trainer(precision: str, trainer) -> None:
    """Dynamic loss scaling for float16."""
    if precision == "float16":
        from mxnet.contrib import amp
        amp.init_trainer(trainer)


@contextmanager
def scaled(precision: str, loss, trainer):
    """Yields what to call ``backward()`` on: ``loss``, scaled for float16 (the trainer's step
    unscales the gradients and skips a step whose gradients overflowed)."""
    if precision != "float16":
        yield loss
        return
    from mxnet.contrib import amp
    with amp.scale_loss(loss, trainer) as scaled_loss:
        yield scaled_loss


def loss_scale(precision: str, trainer):
    """The current float16 loss scale (a metric), else None."""
    return trainer._amp_loss_scaler.loss_scale if precision == "float16" else None
