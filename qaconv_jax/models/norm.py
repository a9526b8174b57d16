"""Batch normalisation with PyTorch's semantics.

Flax's ``nn.BatchNorm`` updates its running variance with the *biased* batch variance;
PyTorch uses the unbiased one. The published QAConv numbers come from PyTorch, and the
converter (issue 6) maps running statistics one to one, so we keep PyTorch's rule.

``scalar=True`` gives the matcher's one-dimensional BN (``BatchNorm1d(1)`` in the official
code): ONE mean and variance over every value of the tensor it is given.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn


class BatchNorm(nn.Module):
  """BN over all axes but the last (per channel), or over all axes (``scalar``).

  Parameters ``scale``/``bias`` and batch_stats ``mean``/``var`` have shape ``[c]`` per
  channel or ``[]`` when scalar. Statistics are computed in float32 whatever ``dtype`` is.
  """

  momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
  epsilon: float = 1e-5
  scalar: bool = False
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """``mask`` (train mode): 0/1 or bool, broadcastable to ``x``; the statistics are over
    the entries where it is 1 only (the padding rows of a sharded class memory must not
    move them)."""
    feature_shape = () if self.scalar else (x.shape[-1],)
    reduce_axes = tuple(range(x.ndim)) if self.scalar else tuple(range(x.ndim - 1))
    scale = self.param("scale", self.scale_init, feature_shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, feature_shape, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)

    x32 = x.astype(jnp.float32)
    if train and mask is None:
      mean = jnp.mean(x32, axis=reduce_axes)
      # Two-pass variance: numerically safer than E[x^2] - E[x]^2 for large means.
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      n = math.prod(x.shape[a] for a in reduce_axes)
    elif train:
      m = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
      n = jnp.sum(m, axis=reduce_axes)
      mean = jnp.sum(x32 * m, axis=reduce_axes) / n
      var = jnp.sum(jnp.square(x32 - mean) * m, axis=reduce_axes) / n
    if train:
      if not self.is_initializing():
        correction = n / max(n - 1, 1) if isinstance(n, int) else n / jnp.maximum(n - 1, 1)
        unbiased = var * correction
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * (scale / jnp.sqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class InstanceNorm(nn.Module):
  """Affine instance normalisation with PyTorch's ``InstanceNorm2d(c, affine=True)``
  semantics: per sample and channel, over (h, w), biased variance, no running statistics
  (so train and eval modes agree). Input ``[N, h, w, c]``; parameters ``scale``/``bias [c]``.
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"InstanceNorm expects [N, h, w, c], got shape {x.shape}.")
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)  # [N, 1, 1, c]
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    y = (x32 - mean) * (scale / jnp.sqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class IBN(nn.Module):
  """IBN-Net-a's mixed normalisation: ``InstanceNorm`` (submodule ``IN``) on the first
  ``c // 2`` channels, ``BatchNorm`` (``BN``) on the rest, as IBN-Net's ``IBN(planes, 0.5)``.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    half = x.shape[-1] // 2
    a = InstanceNorm(dtype=self.dtype, name="IN")(x[..., :half])
    b = BatchNorm(dtype=self.dtype, name="BN")(x[..., half:], train)
    return jnp.concatenate([a, b], axis=-1)
