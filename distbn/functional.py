"""The book's from-scratch batch-norm function, in plain NDArray arithmetic.

It is the readable statement of the math (and the baseline the layer benchmark calls "the
book's from-scratch implementation"); the blocks in :mod:`distbn.layers` compute the same
thing with fused kernels and are tested against it.
"""
from __future__ import annotations

from mxnet import autograd


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """Return ``(Y, moving_mean, moving_var)`` for 2-D (N, C) or 4-D (N, C, H, W) ``X``.

    ``gamma``, ``beta`` and the moving statistics have shape (1, C) or (1, C, 1, 1). Training
    mode (``autograd.is_training()``) uses the batch mean and biased batch variance and returns
    the updated moving statistics ``momentum * moving + (1 - momentum) * batch``; prediction
    mode uses the moving statistics and returns them unchanged. Legacy NDArrays or, in
    numpy mode, ``mx.np`` arrays (the book's current edition).
    """
    if not autograd.is_training():
        X_hat = (X - moving_mean) / (moving_var + eps) ** 0.5
    else:
        if X.ndim == 2:  # fully connected: statistics over the batch
            mean = X.mean(axis=0, keepdims=True)
            var = ((X - mean) ** 2).mean(axis=0, keepdims=True)
        elif X.ndim == 4:  # convolution: per channel, over batch and both spatial axes
            mean = X.mean(axis=(0, 2, 3), keepdims=True)
            var = ((X - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        else:
            raise ValueError(f"batch_norm takes 2-D or 4-D input, got shape {X.shape}")
        X_hat = (X - mean) / (var + eps) ** 0.5
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    return gamma * X_hat + beta, moving_mean, moving_var
