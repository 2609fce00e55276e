"""The trainer's ``train.precision``: float32, or MXNet's AMP in bfloat16 (CPUs) or float16 (GPUs).

Both AMP precisions use ``amp.init()``, called before the network is built: MXNet's operator
functions then cast to the low precision for the operators AMP lists (convolutions, dense
layers) and to float32 for the others that need it, in imperative calls and in hybridized
graphs alike. The network, its parameters (float32), its checkpoints and the BN layers' statistics
(float32 between two casts, summed in float64: distbn.layers) stay as in a float32 run, so a
checkpoint resumes in any precision. float16 also needs loss scaling (its range ends at 65504;
bfloat16 has float32's): ``amp.init_trainer`` and ``amp.scale_loss``.

Where each can run (checked before anything is built, with a one-line error otherwise):
bfloat16 on CPUs where oneDNN runs a bfloat16 convolution (AVX-512; asked of oneDNN itself by
:mod:`distbn.hardware`); float16 on GPUs (MXNet has no float16 convolution on the CPU).
"""
from __future__ import annotations

from contextlib import contextmanager

from . import hardware
from .config import ConfigError


def unsupported(precision: str, on_gpu: bool, bfloat16_why=None):
    """Why ``precision`` cannot train here, or None. ``bfloat16_why``: what the CPU probe
    said (:func:`distbn.hardware.bfloat16_unsupported`; None: bfloat16 runs)."""
    if precision == "float16" and not on_gpu:
        return ("train.precision float16 trains on GPUs only (MXNet has no float16 convolution "
                "on the CPU); on CPUs use bfloat16")
    if precision == "bfloat16" and on_gpu:
        return "train.precision bfloat16 is MXNet's CPU mixed precision; on GPUs use float16"
    if precision == "bfloat16" and bfloat16_why:
        return f"train.precision bfloat16 cannot run here: {bfloat16_why}; use float32"
    return None


def check(precision: str, ctx) -> None:
    """Raises ConfigError when ``precision`` cannot train on ``ctx``."""
    on_gpu = ctx.device_type == "gpu"
    probe = precision == "bfloat16" and not on_gpu  # the probe runs oneDNN: only when asked
    why = unsupported(precision, on_gpu, hardware.bfloat16_unsupported() if probe else None)
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
    """Yields what to run backward from: ``loss`` (an array, or a list of one per device),
    scaled for float16 (the trainer's step unscales the gradients and skips a step whose
    gradients overflowed)."""
    if precision != "float16":
        yield loss
        return
    from mxnet.contrib import amp
    with amp.scale_loss(loss, trainer) as scaled_loss:
        yield scaled_loss


def loss_scale(precision: str, trainer):
    """The current float16 loss scale (a metric), else None."""
    return trainer._amp_loss_scaler.loss_scale if precision == "float16" else None
