"""Building blocks shared by the trunk, the decoder ladder and the latent heads.

Precision (`model.compute_dtype`): every layer keeps float32 parameters; `dtype` is the dtype
its computation runs in (inputs and parameters are cast to it). The Gaussian heads' output layer
always runs in float32, so the distribution parameters every KL and log-density read are float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hvae.model.distributions import DiagGaussian
from hvae.typed_config import UPSAMPLING

# softplus(x + _SOFTPLUS_ONE) = 1 at x = 0: heads start at sigma = 1 (plus the floor).
_SOFTPLUS_ONE = math.log(math.e - 1.0)
_MIN_SIGMA = 1e-4  # keeps log sigma finite even when the floor is 0


def conv(features: int, kernel: int = 3, *, scale: float = 1.0, name: str | None = None,
         dtype: Any = jnp.float32):
  """A SAME-padded convolution computing in `dtype` (float32 parameters); `scale` shrinks the
  init of a layer that feeds a residual."""
  init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nn.Conv(features, (kernel, kernel), padding="SAME", kernel_init=init, name=name,
                 dtype=dtype, param_dtype=jnp.float32)


def upsample(x: jnp.ndarray, method: str = "nearest") -> jnp.ndarray:
  """2x upsampling, [B, r, r, C] -> [B, 2r, 2r, C].

  "nearest" repeats each cell 2x2 (the seed's); "bilinear" interpolates between cell centres
  (weights 3/4, 1/4; edges clamped), so a coarse state arrives at the finer level smooth rather
  than as blocks the few residual blocks of a small model must learn to remove.
  """
  if method == "nearest":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if method == "bilinear":
    return _upsample_linear(_upsample_linear(x, 1), 2)
  raise ValueError(f"upsample: method {method!r} is not one of {UPSAMPLING}")


def _upsample_linear(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Doubles `axis` with linear interpolation at half-pixel offsets (clamped at the edges)."""
  n = x.shape[axis]
  prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                         jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  even = 0.75 * x + 0.25 * prev  # output 2i sits a quarter cell before centre i
  odd = 0.75 * x + 0.25 * nxt  # output 2i + 1 a quarter cell after it
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def downsample(x: jnp.ndarray) -> jnp.ndarray:
  """2x average pooling, [B, 2r, 2r, C] -> [B, r, r, C]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
  """x + conv(gelu(conv(gelu(x)))); the last conv starts small: deep stacks start near identity."""

  width: int
  residual_scale: float = 0.1
  dtype: Any = jnp.float32  # compute dtype of the convolutions and activations

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = conv(self.width, 3, dtype=self.dtype)(nn.gelu(x))
    h = conv(self.width, 3, scale=self.residual_scale, dtype=self.dtype)(nn.gelu(h))
    return x + h


def res_block(remat: bool):
  """The residual block class; with `remat`, wrapped in `nn.remat` (its activations are
  recomputed in the backward pass instead of stored; parameter paths and values unchanged)."""
  return nn.remat(ResBlock) if remat else ResBlock


def gaussian_from_raw(mean: jnp.ndarray, raw_scale: jnp.ndarray, sigma_floor: float):
  """sigma = floor + softplus(raw) (never below the floor); raw = 0 gives sigma = 1 + floor."""
  sigma = sigma_floor + _MIN_SIGMA + nn.softplus(raw_scale + _SOFTPLUS_ONE)
  return DiagGaussian(mean, jnp.log(sigma))


class GaussianHead(nn.Module):
  """Maps features to a diagonal Gaussian over one level's latent.

  A 2-D level ([B, r, r, C] features) gets a 3x3 conv to 2 * channels; the vector level gets
  the features flattened and a dense layer to 2 * channels. The output layer starts small so
  every posterior and prior starts near N(0, 1) and every KL near 0. It runs in float32 whatever
  the features' dtype (a layer of 2 * channels outputs: cheap), so mean and log-scale are float32.
  """

  channels: int
  vector: bool
  sigma_floor: float = 0.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h: jnp.ndarray, *, train: bool) -> DiagGaussian:
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.gelu(h)
    init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    if self.vector:
      out = nn.Dense(2 * self.channels, kernel_init=init, **f32)(h.reshape(h.shape[0], -1))
    else:
      out = nn.Conv(2 * self.channels, (3, 3), padding="SAME", kernel_init=init, **f32)(h)
    mean, raw = jnp.split(out, 2, axis=-1)
    return gaussian_from_raw(mean, raw, self.sigma_floor)
