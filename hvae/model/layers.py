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

from hvae.model.distributions import DiagGaussian, soft_clamp
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


def _pull(c: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One pull step of the hole fills: ([B, r, r, C] the w-weighted mean of each 2x2 block of `c`,
  [B, r, r, 1] the block's summed weight) from c [B, 2r, 2r, C] and its weights w."""
  b, h, wd, ch = c.shape
  w_sum = w.reshape(b, h // 2, 2, wd // 2, 2, w.shape[-1]).sum((2, 4))
  wc = (w * c).reshape(b, h // 2, 2, wd // 2, 2, ch).sum((2, 4))
  return wc / jnp.maximum(w_sum, 1e-6), w_sum


def pull_push_fill(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Fills the missing pixels of `x` smoothly from the given ones (pull-push, Gortler et al.
  1996, with bilinear push): given pixels are returned exactly, missing ones become a convex
  combination of given ones (so they stay within the context's range), computed from `x * mask`
  and `mask` alone: nothing of the hole leaks in.

  Pull: halve the resolution until 1x1; each cell's colour is the weighted mean of its 2x2
  children, its weight their summed weight clipped to 1 (level 0: the mask). Push: from the
  coarsest level down, a cell keeps its own colour with its weight and takes the bilinearly
  upsampled coarser colour with the rest. On 100 held-out LFW faces with the centre 32x32 missing
  this scores 17.0 dB PSNR on the hole, biharmonic inpainting 16.5 (and ~1000x the cost).

  Args:
    x: [B, H, W, C] values; H = W a power of 2.
    mask: [B, H, W, 1], 1 = given, 0 = missing (0/1; fractional weights are read as such).

  Returns:
    [B, H, W, C]: x where mask = 1, the fill elsewhere; all-missing images get 0.
  """
  colours, weights = [x * mask], [mask]  # level 0's colour where its weight > 0
  while colours[-1].shape[1] > 1:
    c, w_sum = _pull(colours[-1], weights[-1])
    colours.append(c)
    weights.append(jnp.minimum(w_sum, 1.0))
  out = colours[-1]
  for c, w in zip(reversed(colours[:-1]), reversed(weights[:-1])):
    out = w * c + (1.0 - w) * upsample(out, "bilinear")
  return out


def _laplacian(u: jnp.ndarray) -> jnp.ndarray:
  """5-point Laplacian of [B, H, W, C] at the interior pixels -> [B, H - 2, W - 2, C]."""
  return (u[:, :-2, 1:-1] + u[:, 2:, 1:-1] + u[:, 1:-1, :-2] + u[:, 1:-1, 2:]
          - 4.0 * u[:, 1:-1, 1:-1])


def _laplacian_adjoint(r: jnp.ndarray) -> jnp.ndarray:
  """The adjoint of `_laplacian`: [B, H - 2, W - 2, C] -> [B, H, W, C]."""
  pad = lambda top, left: jnp.pad(r, ((0, 0), (top, 2 - top), (left, 2 - left), (0, 0)))  # noqa: E731
  return pad(0, 1) + pad(2, 1) + pad(1, 0) + pad(1, 2) - 4.0 * pad(1, 1)


def _biharmonic_steps(x: jnp.ndarray, mask: jnp.ndarray, u: jnp.ndarray, steps: int):
  """`steps` conjugate-gradient steps on the biharmonic energy sum |Laplacian(v)|^2 over the
  missing pixels of v (v = x where mask = 1), from v = u; per image and channel."""
  hole = 1.0 - mask
  apply = lambda v: hole * _laplacian_adjoint(_laplacian(hole * v))  # noqa: E731
  dot = lambda a, b: jnp.sum(a * b, axis=(1, 2), keepdims=True)  # noqa: E731
  safe_div = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)  # noqa: E731
  v = hole * u
  r = -hole * _laplacian_adjoint(_laplacian(x * mask)) - apply(v)
  rr = dot(r, r)

  def step(_, state):
    v, r, p, rr = state
    ap = apply(p)
    alpha = safe_div(rr, dot(p, ap))
    v, r = v + alpha * p, r - alpha * ap
    rr_next = dot(r, r)
    return v, r, r + safe_div(rr_next, rr) * p, rr_next

  v, *_ = jax.lax.fori_loop(0, steps, step, (v, r, r, rr))
  return x * mask + v


def multiscale_fill(x: jnp.ndarray, mask: jnp.ndarray, steps: int = 10,
                    coarsest: int = 8) -> jnp.ndarray:
  """A smooth fill of the missing pixels, coarse to fine: the image and its mask are reduced by
  2x2 weighted means to `coarsest` px (a coarse pixel counts as given only if its 4 children
  are), `pull_push_fill` fills the coarsest level, and at every finer level the bilinearly
  upsampled solution starts `steps` conjugate-gradient steps on the biharmonic energy. Given
  pixels are returned exactly; the fill is computed from `x * mask` and `mask` alone.

  Few steps per level on purpose: the result sits between the pull-push fill and the converged
  biharmonic solution, and beats both on held-out crops with the centre 32x32 missing (PSNR of
  the hole: 100 LFW faces 17.6 dB vs biharmonic 16.5 and pull-push 16.9; the embedded
  photographs' 64 validation crops 18.6 vs 17.7 and 16.5; more steps converge towards the
  biharmonic solution and score lower). ~2 ms per 64x64 image on a 2-core CPU.

  Args:
    x: [B, H, W, C] values; H = W a power of 2, >= `coarsest`.
    mask: [B, H, W, 1], 1 = given, 0 = missing.
    steps: conjugate-gradient steps per level.
    coarsest: side of the coarsest level.

  Returns:
    [B, H, W, C]: x where mask = 1, the fill elsewhere; all-missing images get 0.
  """
  images, masks = [x * mask], [mask]
  while images[-1].shape[1] > coarsest:
    c, w_sum = _pull(images[-1], masks[-1])
    w = (w_sum > 3.5).astype(x.dtype)  # given only if all 4 children are
    images.append(c * w)
    masks.append(w)
  u = _biharmonic_steps(images[-1], masks[-1], pull_push_fill(images[-1], masks[-1]), steps)
  for image, m in zip(reversed(images[:-1]), reversed(masks[:-1])):
    u = _biharmonic_steps(image, m, upsample(u, "bilinear"), steps)
  return u


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


def remat_level(remat: tuple[bool, ...], level: int) -> bool:
  """Whether level `level`'s residual blocks are rematerialised: `remat` is `model.remat`, one
  flag per level (entry l - 1 for level l), () = none."""
  return bool(remat) and remat[level - 1]


def gaussian_from_raw(mean: jnp.ndarray, raw_scale: jnp.ndarray, sigma_floor: float,
                      clamp: float = 0.0):
  """sigma = floor + softplus(raw) (never below the floor); raw = 0 gives sigma = 1 + floor.

  With `clamp` = c > 0 (`model.head_clamp`) the mean and raw first pass through `soft_clamp`:
  |mean| <= c and softplus(_SOFTPLUS_ONE - c) <= sigma - floor - 1e-4 <= softplus(_SOFTPLUS_ONE
  + c) (float32's tanh reaches 1 exactly). The bound is on the heads' outputs: a refinement's
  `posterior_offset` (hvae/amortisation.py) is added after it. Without it, a head whose input
  features run away can put sigma at its 1e-4 minimum and the mean far out at once: one
  dimension of one example cost 2e16 nats on faces at the anneal's end (docs/results.md, "The
  anneal's spikes").
  """
  mean, raw_scale = soft_clamp(mean, clamp), soft_clamp(raw_scale, clamp)
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
  clamp: float = 0.0  # `model.head_clamp` (`soft_clamp`)

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
    return gaussian_from_raw(mean, raw, self.sigma_floor, self.clamp)
