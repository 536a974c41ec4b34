"""The hierarchical VAE of docs/design.md §2: trunk, posterior, top-down prior ladder, output head.

Parameter paths are stable and per level, so per-level remedies can address them:

  trunk/...                 shared g (stem, g{l}_block{b})
  posterior_mask_proj       1x1 conv of the mask added to h^q_0 (posterior_sees_mask)
  level_{l}/q_head          posterior head of level l        (hvae only)
  level_{l}/p_head          prior head of level l  (hvae only; none for a standard-normal top)
  level_{l}/z_proj          projection merging z_l into the decoder state d_l (hvae only)
  level_{l}/group_{g}/...   latent group g >= 2 of level l (`model.latent_groups`, channels or
                            positions: `model.latent_group_layout`): block (its residual
                            block), q_head, p_head, z_proj
  level_{l}/merged_{b}      residual block b after z_l's last merge (`model.merge_blocks`)
  level_{l}/decoder         f_l: the decoder block producing d_l (l < L)
  output_head               f_0: the likelihood parameters at 64x64

Speed and memory switches (docs/design.md "Speed, precision and memory") change no parameter
path: `model.compute_dtype` (convolutions and activations in bfloat16, parameters, distribution
parameters, KL and log-likelihoods float32), `model.remat` (residual blocks of a level
rematerialised) and `model.likelihood_region` (the training pass's output head and likelihood on
a static box around the hole only, `ModelOutput.region`).

Which latent each level uses is chosen per call (`sources`, `latents`, `noise`, `temperature`),
which is what the posterior->prior swap, "resample one level", temperature sampling and the
importance-weighted bound are built on.

Why one file past ~350 lines: the posterior, the prior ladder and the output head share one
module's parameters and its per-call latent routing; split, each part would pass that routing on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hvae.model import layers, likelihoods
from hvae.model.distributions import DiagGaussian
from hvae.model.trunk import Trunk
from hvae.typed_config import HOLE_FILLS, LIKELIHOOD_REGIONS, ModelConfig

POSTERIOR = "posterior"
PRIOR = "prior"
SOURCES = (POSTERIOR, PRIOR)


@flax.struct.dataclass
class LevelOutput:
  """What one latent level did in a forward pass. Shapes: S = (r, r, c) or (top_latent_dim,)."""

  z: jnp.ndarray  # [B, *S] the latent used
  p: DiagGaussian  # [B, *S] conditional prior p(z_l | z_{>l}, x_outer), temperature 1
  q: DiagGaussian | None  # [B, *S] posterior, None when the posterior was not computed
  kl: jnp.ndarray | None  # [B, *S] analytic KL(q || p) per latent dimension, nats
  log_q: jnp.ndarray | None  # [B] log q(z_l | ...) of the z used
  log_p: jnp.ndarray  # [B] log p(z_l | z_{>l}, x_outer) of the z used


@flax.struct.dataclass
class ModelOutput:
  """A forward pass. `levels[l - 1]` is level l (1 = finest); empty for the deterministic kind.

  `px_params` and `log_px` cover the whole image unless `region` is set (a training pass with
  `model.likelihood_region`, or `likelihood_region=` given): then they cover only the static box
  `region` = (top, bottom, left, right), end-exclusive, [B, bottom - top, right - left, ...],
  with exactly the values the whole-image pass has there. `objective.elbo_terms` reads both.
  """

  px_params: jnp.ndarray  # [B, 64, 64, P] likelihood parameters of every pixel (float32)
  log_px: jnp.ndarray  # [B, 64, 64] log p(x | z, x_outer) of each pixel of `image`, nats
  levels: tuple[LevelOutput, ...]
  region: tuple[int, int, int, int] | None = flax.struct.field(pytree_node=False, default=None)


def preprocess(image: jnp.ndarray, mask: jnp.ndarray, hole_fill: str = "zeros"):
  """The network inputs of docs/design.md §2 from raw pixels.

  Args:
    image: [B, 64, 64, 3] pixel values in [0, 255] (uint8 or float; differentiable if float).
    mask: [B, 64, 64, 1] float, 1 = given, 0 = missing.
    hole_fill: `model.hole_fill`: "zeros" (the seed's x * m), "pull_push" or "multiscale" (the
      hole holds `layers.pull_push_fill` / `layers.multiscale_fill` of x * m: a smooth fill
      computed from the context alone).

  Returns:
    (a_q, a_p), each [B, 64, 64, 4]: concat(x, 1) and concat(fill(x * m), m), x in [-1, 1].
  """
  x = jnp.asarray(image, jnp.float32) / 127.5 - 1.0
  mask = jnp.asarray(mask, jnp.float32)
  a_q = jnp.concatenate([x, jnp.ones_like(mask)], axis=-1)
  fills = {"zeros": lambda x, m: x * m, "pull_push": layers.pull_push_fill,
           "multiscale": layers.multiscale_fill}
  if hole_fill not in fills:
    raise ValueError(f"hole_fill: {hole_fill!r} is not one of {HOLE_FILLS}")
  given = fills[hole_fill](x, mask)
  a_p = jnp.concatenate([given, mask], axis=-1)
  return a_q, a_p


class DecoderBlock(nn.Module):
  """f_l: optional context skip (1x1 of h^p_l added), then residual blocks."""

  width: int
  num_blocks: int
  dtype: Any = jnp.float32  # compute dtype (`model.compute_dtype`)
  remat: bool = False  # rematerialise the residual blocks (`model.remat`)

  @nn.compact
  def __call__(self, u: jnp.ndarray, skip: jnp.ndarray | None) -> jnp.ndarray:
    conv = functools.partial(layers.conv, dtype=self.dtype)
    h = u if u.shape[-1] == self.width else conv(self.width, 1, name="in_proj")(u)
    if skip is not None:
      h = h + conv(self.width, 1, name="skip")(skip)
    block = layers.res_block(self.remat)
    for b in range(self.num_blocks):
      h = block(self.width, dtype=self.dtype, name=f"block{b}")(h)
    return h


class LatentGroup(nn.Module):
  """Latent group g >= 2 of a level (`model.latent_groups`): a residual block that turns the state
  merged with groups < g into d_{l,g}, then its own heads and z projection, as group 1's."""

  config: ModelConfig
  level: int
  dtype: Any = jnp.float32

  def setup(self):
    cfg, l = self.config, self.level
    width = cfg.level_width(l)
    self.block = layers.res_block(layers.remat_level(cfg.remat, l))(width, dtype=self.dtype)
    channels = cfg.group_channels(l)
    self.q_head = _head(cfg, l, channels)
    self.p_head = _head(cfg, l, channels)
    self.z_proj = layers.conv(width, 1, dtype=self.dtype)


def _head(cfg: ModelConfig, l: int, channels: int, vector: bool = False) -> layers.GaussianHead:
  return layers.GaussianHead(channels, vector=vector, sigma_floor=cfg.sigma_floor[l - 1],
                             clamp=cfg.head_clamp,
                             dropout=cfg.dropout[l - 1])


class Level(nn.Module):
  """Everything that belongs to level l: its heads, its z projection and its decoder f_l.

  With G = `model.latent_groups` > 1, z_l is drawn in G groups: group 1 uses the heads below,
  group g >= 2 the `LatentGroup` `group_{g}`, whose prior and posterior see the state merged with
  groups < g (so its prior correlates positions through their samples). A group is a slice of
  the channels (`model.latent_group_layout="channels"`) or all channels on a sub-lattice of the
  positions ("space", `space_masks`): then a position's prior sees its neighbours' samples.
  """

  config: ModelConfig
  level: int
  dtype: Any = jnp.float32  # compute dtype (`model.compute_dtype`)

  def setup(self):
    cfg, l, dtype = self.config, self.level, self.dtype
    self.is_top = l == cfg.num_levels
    if cfg.has_latents:
      groups = cfg.groups(l)
      channels = cfg.top_latent_dim if self.is_top else cfg.group_channels(l)
      self.q_head = _head(cfg, l, channels, self.is_top)
      if not (self.is_top and cfg.top_prior == "standard_normal"):
        self.p_head = _head(cfg, l, channels, self.is_top)
      if self.is_top:
        r = cfg.resolution(l)
        self.z_proj = nn.Dense(r * r * cfg.level_width(l), dtype=dtype, param_dtype=jnp.float32)
      else:
        self.z_proj = layers.conv(cfg.level_width(l), 1, dtype=dtype)
      if groups > 1:
        self.group = {g: LatentGroup(cfg, l, dtype) for g in range(2, groups + 1)}
      block = layers.res_block(layers.remat_level(cfg.remat, l))
      self.merged = [block(cfg.level_width(l), dtype=dtype) for _ in range(cfg.merge_blocks)]
    if not self.is_top:
      self.decoder = DecoderBlock(cfg.level_width(l), cfg.blocks_per_level, dtype,
                                  layers.remat_level(cfg.remat, l))

  def _unit(self, group: int):
    return self if group == 1 else self.group[group]

  def decode(self, u, skip):
    """d_l = f_l(u, [h^p_l]) for the upsampled state u."""
    return self.decoder(u, skip)

  def advance(self, state: jnp.ndarray, group: int) -> jnp.ndarray:
    """d_{l,g} for group g >= 2 from the state merged with groups < g."""
    return self.group[group].block(state)

  def prior(self, d: jnp.ndarray, train: bool, group: int = 1) -> DiagGaussian:
    """p(z_l | z_{>l}, x_outer) (of group `group`, given the groups before it) from d_l."""
    if self.is_top and self.config.top_prior == "standard_normal":
      return DiagGaussian.standard((d.shape[0], self.config.top_latent_dim), jnp.float32)
    return self._unit(group).p_head(d, train=train)

  def posterior(self, h: jnp.ndarray, train: bool, group: int = 1) -> DiagGaussian:
    """q(z_l | ...) (of group `group`) from its input features (h^q_l, or concat(d_l, h^q_l) for
    top_down).

    In training, the encoder-only remedies act on those features first: dropout
    (`regularize.posterior_dropout`), then additive Gaussian noise (`posterior_noise`, its std,
    from the "dropout" stream). Neither touches the prior head's input.
    """
    cfg, l = self.config, self.level
    rate = cfg.posterior_dropout[l - 1] if cfg.posterior_dropout else 0.0
    std = cfg.posterior_noise[l - 1] if cfg.posterior_noise else 0.0
    if train and rate > 0:  # inverted dropout, as nn.Dropout (no submodule outside setup)
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, h.shape)
      h = jnp.where(keep, h / (1.0 - rate), 0.0)
    if train and std > 0:
      h = h + std * jax.random.normal(self.make_rng("dropout"), h.shape, h.dtype)
    return self._unit(group).q_head(h, train=train)

  def merge(self, d: jnp.ndarray, z: jnp.ndarray, group: int = 1) -> jnp.ndarray:
    """merge(d_l, z_l) = d_l + proj(z_l), at level l's own resolution (z of group `group`)."""
    return d + self._unit(group).z_proj(z).reshape(d.shape)

  def after_merge(self, state: jnp.ndarray) -> jnp.ndarray:
    """The `model.merge_blocks` residual blocks on the state merged with all of z_l."""
    for block in self.merged:
      state = block(state)
    return state


class OutputHead(nn.Module):
  """f_0: sees the upsampled state, h^p_0 (context skip) and a_p itself, gives pixel parameters.

  The last (1x1) layer runs in float32 whatever `dtype`: the likelihood parameters are float32.
  """

  width: int
  num_blocks: int
  num_params: int
  context_skips: bool
  dtype: Any = jnp.float32  # compute dtype (`model.compute_dtype`)
  remat: bool = False  # rematerialise the residual blocks (`model.remat`)

  @property
  def halo(self) -> int:
    """Receptive-field radius in pixels: the 3x3 context conv and two 3x3 convs per block."""
    return 1 + 2 * self.num_blocks

  @nn.compact
  def __call__(self, u, h_p0, a_p, box: tuple[int, int, int, int] | None = None):
    """Pixel parameters [B, H, W, P] of the whole image, or [B, bottom - top, right - left, P] of
    the static `box` (top, bottom, left, right) only.

    For a box, every layer runs on the box grown by `halo` pixels (clipped at the image edge,
    where the crop's SAME padding is the image's own), and the output drops the halo: each
    kept pixel sees exactly the inputs it sees in the whole-image pass, so the values are the
    same; the work is that of the grown box.
    """
    if box is not None:
      y0, y1, x0, x1 = box
      size_y, size_x = u.shape[1:3]
      if not (0 <= y0 < y1 <= size_y and 0 <= x0 < x1 <= size_x):
        raise ValueError(f"likelihood box {box} does not fit in a {size_y}x{size_x} image")
      g = self.halo
      gy0, gy1, gx0, gx1 = max(y0 - g, 0), min(y1 + g, size_y), max(x0 - g, 0), min(x1 + g, size_x)
      u, h_p0, a_p = (t[:, gy0:gy1, gx0:gx1] for t in (u, h_p0, a_p))
    conv = functools.partial(layers.conv, dtype=self.dtype)
    if u.shape[-1] != self.width:
      u = conv(self.width, 1, name="in_proj")(u)
    h = u + conv(self.width, 3, name="context")(a_p)
    if self.context_skips:
      h = h + conv(self.width, 1, name="skip")(h_p0)
    block = layers.res_block(self.remat)
    for b in range(self.num_blocks):
      h = block(self.width, dtype=self.dtype, name=f"block{b}")(h)
    params = layers.conv(self.num_params, 1, name="out", dtype=jnp.float32)(nn.gelu(h))
    if box is not None:
      params = params[:, y0 - gy0:y1 - gy0, x0 - gx0:x1 - gx0]
    return params


def space_masks(resolution: int, groups: int) -> list[np.ndarray]:
  """The "space" layout's positions of each latent group, as (r, r, 1) booleans in drawing order:
  1 group: all; 2: a checkerboard (the even squares first); 4: the 2x2 sub-lattices, the diagonal
  pair first ((0, 0), (1, 1), (0, 1), (1, 0)), so each later one has earlier neighbours on every
  side."""
  i, j = np.meshgrid(np.arange(resolution), np.arange(resolution), indexing="ij")
  if groups == 1:
    cells = [np.ones_like(i, bool)]
  elif groups == 2:
    cells = [(i + j) % 2 == 0, (i + j) % 2 == 1]
  elif groups == 4:
    cells = [(i % 2 == a) & (j % 2 == b) for a, b in ((0, 0), (1, 1), (0, 1), (1, 0))]
  else:
    raise ValueError(f"space_masks: {groups} groups (1, 2 or 4)")
  return [c[..., None] for c in cells]  # NumPy: constants, not traced values


def _by_position(values: list[jnp.ndarray], masks: list[np.ndarray]) -> jnp.ndarray:
  """One map from the "space" groups' full maps: at each position, its own group's value."""
  out = values[0]
  for v, m in zip(values[1:], masks[1:]):
    out = jnp.where(m, v, out)
  return out


def _select(dists: list[DiagGaussian], masks: list[np.ndarray]) -> DiagGaussian:
  """One level's "space" groups as one Gaussian: at each position, its own group's."""
  return DiagGaussian(_by_position([d.mean for d in dists], masks),
                      _by_position([d.log_scale for d in dists], masks))


def split_trunk(both: list[jnp.ndarray], batch: int) -> tuple[list, list]:
  """(h^p, h^q) from the trunk's outputs on a_q and a_p stacked along the batch (a_q first)."""
  return [h[batch:] for h in both], [h[:batch] for h in both]


def _concat(dists: list[DiagGaussian]) -> DiagGaussian:
  """One level's latent groups as one Gaussian (channels concatenated, group 1 first)."""
  if len(dists) == 1:
    return dists[0]
  return DiagGaussian(jnp.concatenate([x.mean for x in dists], -1),
                      jnp.concatenate([x.log_scale for x in dists], -1))


def _per_level(value, num_levels: int, name: str) -> tuple:
  if value is None or not isinstance(value, Sequence) or isinstance(value, str):
    return (value,) * num_levels
  if len(value) != num_levels:
    raise ValueError(f"{name}: expected {num_levels} entries (one per level), got {len(value)}")
  return tuple(value)


class HVAE(nn.Module):
  """The hierarchical VAE (or, with kind="deterministic", the encoder-decoder baseline).

  RNG streams: "sample" (latent noise, dequantisation), "dropout" (training only).
  """

  config: ModelConfig

  @property
  def likelihood(self) -> likelihoods.Likelihood:
    """The likelihood, its location gradients and clamp as `model.likelihood_grad` and
    `model.likelihood_mean_clamp` say."""
    return likelihoods.get(self.config.likelihood, self.config.num_mixtures,
                           self.config.likelihood_grad, self.config.likelihood_mean_clamp)

  @nn.compact
  def __call__(
      self,
      image: jnp.ndarray,
      mask: jnp.ndarray,
      *,
      train: bool = False,
      sources: str | Sequence[str] = POSTERIOR,
      latents: Sequence[jnp.ndarray | None] | None = None,
      noise: Sequence[jnp.ndarray | None] | None = None,
      temperature: float | Sequence[float] = 1.0,
      compute_posterior: bool | None = None,
      posterior_offset: Sequence[DiagGaussian | None] | None = None,
      location_grad_power: jnp.ndarray | float | None = None,
      likelihood_region: str | None = None,
      features: tuple[Sequence[jnp.ndarray], Sequence[jnp.ndarray] | None] | None = None,
  ) -> ModelOutput:
    """Runs the model.

    Args:
      image: [B, 64, 64, 3] pixels in [0, 255]. Only the given pixels reach the prior and the
        decoder; the missing ones reach the posterior (and `log_px`, which scores this image).
      mask: [B, 64, 64, 1] float, 1 = given.
      train: enables dropout.
      sources: per level (or one for all) "posterior" or "prior": where z_l is drawn from.
      latents: per level, an explicit z_l (overrides `sources` for that level) or None.
      noise: per level, the standard-normal eps used for z_l = mean + tau * sigma * eps, or
        None to draw it from the "sample" stream.
      temperature: tau, global or per level; scales sigma of prior-drawn levels only.
      compute_posterior: run the posterior side (default: iff some level draws from it). When
        False, q, kl and log_q are None and `image`'s missing pixels are never read.
      posterior_offset: per level, a `DiagGaussian` [B, *S] whose mean and log_scale are ADDED
        to the posterior's (None: the encoder's posterior unchanged, as is the default).
        Per-example refinement (hvae/amortisation.py) optimises these offsets with everything
        else frozen. For bottom_up posteriors, q_l does not depend on z_>l, so encoder + offset
        spans every diagonal Gaussian: the free-form (per-example, mean-field) family. For
        top_down, q_l depends on the decoder state given the sampled z_>l; the offset shifts
        that conditional posterior by a per-example constant and keeps its dependence on z_>l.
        That family contains the encoder exactly (offset 0, for any noise), which replacing
        the parameters by free values would not; it is not the free-form family.
      location_grad_power: p of the likelihood's location-gradient factor scale**p
        (`likelihoods.location_grad_power`; the train step passes it when
        `model.likelihood_grad_anneal` is set). None: the mode's own factor (p = 1). Values,
        hence every output, are the same for every p; only gradients differ.
      likelihood_region: a name of `typed_config.LIKELIHOOD_REGIONS`: "all" (every pixel) or a
        static box ("centre") that px_params and log_px are computed on alone (the output head
        runs on the box and a halo; `ModelOutput.region`). Only for masks whose missing pixels
        all lie in the box: `objective.elbo_terms` refuses others. None (the default):
        `model.likelihood_region` in a training pass (`train=True`, the train step's), "all"
        in every other, so sampling, evaluation and the IW bound always get every pixel.
      features: (h^p, h^q), the trunk's outputs for these inputs (h^q None when the posterior
        is not computed), used instead of running the trunk; None (the default) runs it. The
        IW bound (hvae/iw.py) computes them once per batch and tiles them over its samples.

    Returns:
      A `ModelOutput`.
    """
    cfg = self.config
    L = cfg.num_levels
    dtype = jnp.dtype(cfg.compute_dtype)
    if likelihood_region is None:
      likelihood_region = cfg.likelihood_region if train else "all"
    if likelihood_region not in LIKELIHOOD_REGIONS:
      raise ValueError(f"likelihood_region: {likelihood_region!r} is not one of "
                       f"{', '.join(LIKELIHOOD_REGIONS)}")
    box = LIKELIHOOD_REGIONS[likelihood_region]
    sources = _per_level(sources, L, "sources")
    latents = _per_level(latents, L, "latents")
    noise = _per_level(noise, L, "noise")
    posterior_offset = _per_level(posterior_offset, L, "posterior_offset")
    temperature = _per_level(temperature, L, "temperature")
    for s in sources:
      if s not in SOURCES:
        raise ValueError(f"sources: {s!r} is not one of {SOURCES}")
    if compute_posterior is None:
      compute_posterior = cfg.has_latents and any(
          s == POSTERIOR and z is None for s, z in zip(sources, latents))
    if not compute_posterior and any(
        s == POSTERIOR and z is None for s, z in zip(sources, latents)) and cfg.has_latents:
      raise ValueError("a level draws from the posterior but compute_posterior=False")

    a_q, a_p = preprocess(image, mask, cfg.hole_fill)
    if features is not None:
      h_p, h_q = features
    else:
      trunk = Trunk(tuple(cfg.level_width(l) for l in range(L + 1)), L, cfg.blocks_per_level,
                    dtype=dtype, remat=cfg.remat, name="trunk")
      h_q = None
      if compute_posterior:
        # One trunk call on a_q and a_p stacked along the batch (the same weights; every layer
        # is per example): one copy of the trunk in the compiled step instead of two, and convs
        # of twice the batch (docs/design.md "Speed, precision and memory").
        extra = None
        if cfg.posterior_sees_mask:
          extra = layers.conv(cfg.width, 1, name="posterior_mask_proj", dtype=dtype)(
              jnp.asarray(mask, a_q.dtype))
          extra = jnp.concatenate([extra, jnp.zeros_like(extra)])  # the prior half gets none
        h_p, h_q = split_trunk(trunk(jnp.concatenate([a_q, a_p]), extra), a_q.shape[0])
      else:
        h_p = trunk(a_p)

    levels = {l: Level(cfg, l, dtype, name=f"level_{l}") for l in range(1, L + 1)}
    outputs = []
    state = h_p[L]  # d_L = h^p_L
    for l in range(L, 0, -1):
      level = levels[l]
      d = state if l == L else level.decode(
          layers.upsample(state, cfg.upsample), h_p[l] if cfg.context_skips else None)
      if not cfg.has_latents:
        state = d
        continue
      groups = cfg.groups(l)
      space = cfg.latent_group_layout == "space" and groups > 1
      masks = space_masks(cfg.resolution(l), groups) if space else [None] * groups
      if space:  # every group draws at all positions and keeps its own (z, noise: full maps)
        split = lambda t, n=groups: (t,) * n  # noqa: E731
      else:
        split = lambda t, n=groups: (None,) * n if t is None else jnp.split(t, n, axis=-1)  # noqa: E731
      offset = posterior_offset[l - 1]
      eps_l = noise[l - 1]
      if space and eps_l is None and latents[l - 1] is None:  # one draw serves every group
        eps_l = jax.random.normal(self.make_rng("sample"), (image.shape[0], *cfg.latent_shape(l)))
      parts = zip(split(latents[l - 1]), split(eps_l),
                  split(None if offset is None else offset.mean),
                  split(None if offset is None else offset.log_scale))
      ps, qs, zs = [], [], []
      state = d
      for g, (z, eps, offset_mean, offset_log_scale) in enumerate(parts, start=1):
        if g > 1:
          state = level.advance(state, g)
        p = level.prior(state, train, g)
        q = None
        if compute_posterior:
          q_in = h_q[l] if cfg.posterior == "bottom_up" else jnp.concatenate([state, h_q[l]], -1)
          q = level.posterior(q_in, train, g)
          if offset_mean is not None:
            q = DiagGaussian(q.mean + offset_mean, q.log_scale + offset_log_scale)
        if z is None:
          if eps is None:
            eps = jax.random.normal(self.make_rng("sample"), p.mean.shape, p.mean.dtype)
          if sources[l - 1] == POSTERIOR:
            z = q.sample(eps)
          else:
            z = p.sample(eps, temperature[l - 1])
        ps.append(p)
        qs.append(q)
        zs.append(z)
        # "space": the group's own positions only (z is masked, not its projection: the 1x1
        # projection's bias reaches every position, a constant per group, and the masking costs
        # c_l channels instead of the state's width)
        state = level.merge(state, z if masks[g - 1] is None else jnp.where(masks[g - 1], z, 0), g)
      state = level.after_merge(state)
      if space:
        p, q = _select(ps, masks), None if q is None else _select(qs, masks)
        z = _by_position(zs, masks)
      else:
        p, q, z = _concat(ps), None if q is None else _concat(qs), jnp.concatenate(zs, -1)
      flat = lambda t: t.reshape(t.shape[0], -1).sum(-1)  # noqa: E731
      outputs.append(LevelOutput(
          z=z, p=p, q=q,
          kl=None if q is None else q.kl(p),
          log_q=None if q is None else flat(q.log_prob(z)),
          log_p=flat(p.log_prob(z))))

    lik = self.likelihood
    if location_grad_power is not None:
      lik = dataclasses.replace(lik, location_grad_power=location_grad_power)
    head = OutputHead(cfg.width, cfg.blocks_per_level, lik.num_params, cfg.context_skips,
                      dtype=dtype, remat=layers.remat_level(cfg.remat, 1), name="output_head")
    px_params = head(layers.upsample(state, cfg.upsample), h_p[0], a_p, box)
    if cfg.fill_residual:  # the head predicts the residual of the prior input's pixels (the fill)
      y0, y1, x0, x1 = box or (0, a_p.shape[1], 0, a_p.shape[2])
      px_params = lik.add_base(px_params, a_p[:, y0:y1, x0:x1, :3])
    rng = self.make_rng("sample") if cfg.likelihood == "gaussian" else None
    if box is None:
      log_px = lik.log_prob(px_params, image, rng)
    else:
      log_px = lik.box_log_prob(px_params, image, rng, box)
    return ModelOutput(px_params=px_params, log_px=log_px, levels=tuple(reversed(outputs)),
                       region=box)


def init(model: HVAE, rng: jax.Array, batch_size: int = 1) -> Any:
  """Initialises the parameters for 64x64 inputs; returns the `params` collection."""
  image = jnp.zeros((batch_size, 64, 64, 3), jnp.float32)
  mask = jnp.ones((batch_size, 64, 64, 1), jnp.float32)
  param_rng, sample_rng = jax.random.split(rng)
  # Jitted: eager initialisation dispatches thousands of small ops and is far slower on CPU.
  init_fn = jax.jit(lambda rngs: model.init(rngs, image, mask)["params"])
  return init_fn({"params": param_rng, "sample": sample_rng})
