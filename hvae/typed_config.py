"""Typed, frozen views of the experiment config, validated before anything is traced.

The ml-collections config (experiments/base.py) is what users type; the model and the loss never
read it directly. `ModelConfig.from_config(config)` resolves per-level tuples (length 1
broadcasts to all L levels; any other length that is not L is an error naming the field) and
checks every field, so a bad config fails here with the field's name, before compilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from hvae.errors import ConfigError  # noqa: F401 (re-exported: hvae.typed_config.ConfigError)

MAX_LEVELS = 6  # level l is at 64 / 2^l; at L = 6 the top features are 1x1
IMAGE_SIZE = 64

KINDS = ("hvae", "deterministic")
POSTERIORS = ("bottom_up", "top_down")
TOP_PRIORS = ("conditional", "standard_normal")
LIKELIHOODS = ("dmol", "discretized_gaussian", "gaussian")
LIKELIHOOD_GRADS = ("exact", "scaled", "scaled_mean")  # hvae.model.likelihoods.LOCATION_GRADS
UPSAMPLING = ("nearest", "bilinear")  # methods of hvae.model.layers.upsample
# What a_p holds in the hole (hvae.model.ladder.preprocess).
HOLE_FILLS = ("zeros", "pull_push", "multiscale")
COMPUTE_DTYPES = ("float32", "bfloat16")
LATENT_GROUP_LAYOUTS = ("channels", "space")  # model.latent_group_layout
SPACE_GROUPS = (1, 2, 4)  # the position sub-lattices of the "space" layout (ladder.space_masks)
FREE_BITS_PRIORS = ("frozen", "learns")  # loss.free_bits_prior: a level below its floor
# Static boxes (top, bottom, left, right), end-exclusive, of the 64x64 image the training pass may
# restrict the likelihood head to (`model.likelihood_region`); "all" = the whole image.
LIKELIHOOD_REGIONS = {"all": None, "centre": (16, 48, 16, 48)}


def per_level(field: str, value: Any, num_levels: int, cast=float) -> tuple:
  """Resolves a per-level field to a tuple of length `num_levels`.

  Args:
    field: dotted name of the field, used in error messages (e.g. "loss.kl_weight").
    value: a scalar, or a sequence of length 1 (broadcast) or `num_levels`.
    num_levels: L.
    cast: element type.

  Returns:
    A tuple of `num_levels` elements, entry l-1 for level l.
  """
  if isinstance(value, str) or not isinstance(value, Sequence):
    value = (value,)
  value = tuple(value)
  if len(value) == 1:
    value = value * num_levels
  if len(value) != num_levels:
    raise ConfigError(
        f"{field}: per-level tuple has length {len(value)}, but model.num_levels = {num_levels}; "
        f"give 1 value (used for every level) or {num_levels} (level 1 = finest first)")
  try:
    return tuple(cast(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{field}: {value!r} is not a tuple of {cast.__name__}") from e


def _strict_bool(value) -> bool:
  """bool(value) for True / False (and 0 / 1); anything else (e.g. the string "False") fails."""
  if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
    return bool(value)
  raise ValueError(f"{value!r} is not a bool")


_strict_bool.__name__ = "bool"  # per_level's error message names the element type


def _choice(field: str, value: str, options: Sequence[str]) -> str:
  if value not in options:
    raise ConfigError(f"{field}: {value!r} is not one of {', '.join(options)}")
  return value


def _positive(field: str, value, *, allow_zero: bool = False):
  if not (value > 0 or (allow_zero and value == 0)):
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{field}: must be {bound}, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model needs, resolved and checked. Tuples are indexed by level - 1."""

  kind: str = "hvae"
  num_levels: int = 4
  posterior: str = "bottom_up"
  context_skips: bool = True
  top_prior: str = "conditional"
  posterior_sees_mask: bool = False
  latent_channels: tuple[int, ...] = (8, 8, 8, 8)  # entry L unused: the top is top_latent_dim
  # per level: z_l drawn in this many groups, each given the ones before it (VDVAE's groups at
  # one resolution); () = 1 everywhere; entry L unused (the top is one vector)
  latent_groups: tuple[int, ...] = ()
  # LATENT_GROUP_LAYOUTS: "channels" splits z_l's channels into the groups; "space" gives every
  # group all channels on its own sub-lattice of positions (2: a checkerboard; 4: the 2x2
  # sub-lattices), so a group's prior sees its neighbours' samples (a spatial autoregression).
  # "space" costs G x the heads of "channels" (each group's heads give all c_l channels at every
  # position and keep 1/G of them), which head_weight_decay's penalty counts too.
  latent_group_layout: str = "channels"
  top_latent_dim: int = 64
  width: int = 64
  level_widths: tuple[int, ...] = ()  # level l's channels at 64/2^l; () or 0 = `width`
  blocks_per_level: int = 2
  # residual blocks after a level's last latent merge, at its own resolution (VDVAE's block after
  # z's projection): a sample is shaped by its neighbours' before the state moves up; 0 = none
  merge_blocks: int = 0
  # c > 0: every Gaussian head's mean and pre-softplus scale pass through c * tanh(. / c) (NVAE's
  # soft clamp, c = 5): |mean| <= c and sigma >= floor + 1e-4 + softplus(0.54 - c), so KL stays
  # bounded (docs/results.md, "The anneal's spikes"); 0 = off
  head_clamp: float = 0.0
  upsample: str = "nearest"
  hole_fill: str = "zeros"  # HOLE_FILLS: the prior input's missing pixels (x * m, or a smooth fill)
  fill_residual: bool = False  # likelihood locations = a_p's pixels (the fill) + the head's output
  likelihood: str = "dmol"
  num_mixtures: int = 5
  # c > 0: the likelihood's locations (dmol's means before the coupling, the Gaussians' means)
  # pass through c * tanh(. / c), so a runaway output head's loss is bounded (docs/results.md,
  # "The clamp and b2 = 0.9 together"); 0 = off
  likelihood_mean_clamp: float = 0.0
  likelihood_grad: str = "exact"
  # (start, end) steps over which the location-gradient factor goes from the mode's (scaled)
  # to exact (likelihoods.location_grad_power); () = the mode throughout
  likelihood_grad_anneal: tuple[int, ...] = ()
  dropout: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # from config.regularize
  sigma_floor: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # from config.regularize
  # Encoder-only remedies (config.regularize; () = 0 on every level): dropout on, and the std of
  # Gaussian noise added to, the features feeding level l's posterior head, in training only.
  posterior_dropout: tuple[float, ...] = ()
  posterior_noise: tuple[float, ...] = ()
  # Speed and memory (docs/design.md "Speed, precision and memory"); none changes what is modelled.
  # The training pass's likelihood head and log-likelihood on this region only (LIKELIHOOD_REGIONS;
  # "centre" needs data.train_mask = "centre"); every other pass computes all pixels.
  likelihood_region: str = "all"
  compute_dtype: str = "float32"  # COMPUTE_DTYPES: convolutions and activations; params float32
  remat: tuple[bool, ...] = ()  # per level: rematerialise its residual blocks; () = none

  def __post_init__(self):
    L = self.num_levels
    _choice("model.kind", self.kind, KINDS)
    if not isinstance(L, int) or not 1 <= L <= MAX_LEVELS:
      raise ConfigError(f"model.num_levels: must be an integer in 1..{MAX_LEVELS}, got {L!r} "
                        f"(level l is at {IMAGE_SIZE}/2^l, so {IMAGE_SIZE}/2^{MAX_LEVELS} = 1 px)")
    _choice("model.posterior", self.posterior, POSTERIORS)
    _choice("model.top_prior", self.top_prior, TOP_PRIORS)
    _choice("model.likelihood", self.likelihood, LIKELIHOODS)
    _choice("model.likelihood_grad", self.likelihood_grad, LIKELIHOOD_GRADS)
    anneal = self.likelihood_grad_anneal
    if anneal:
      if len(anneal) != 2 or not all(isinstance(t, int) and t >= 0 for t in anneal) or (
          anneal[1] < anneal[0]):
        raise ConfigError("model.likelihood_grad_anneal: expected () or (start, end) steps with "
                          f"0 <= start <= end, got {anneal!r}")
      if self.likelihood_grad == "exact":
        raise ConfigError("model.likelihood_grad_anneal: anneals a scaled mode to exact "
                          "gradients, but model.likelihood_grad is already 'exact'")
    _choice("model.upsample", self.upsample, UPSAMPLING)
    _choice("model.hole_fill", self.hole_fill, HOLE_FILLS)
    _choice("model.likelihood_region", self.likelihood_region, tuple(LIKELIHOOD_REGIONS))
    if self.likelihood_region != "all" and self.likelihood_grad == "scaled_mean":
      raise ConfigError("model.likelihood_region: 'scaled_mean' location gradients normalise by "
                        "the mean scale over every pixel computed, so a region would change the "
                        "gradients; use model.likelihood_region='all' or likelihood_grad='scaled'")
    _choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    if self.remat and len(self.remat) != L:
      raise ConfigError(f"model.remat: has {len(self.remat)} entries for {L} levels")
    for l, r in enumerate(self.remat, start=1):
      if not isinstance(r, bool):
        raise ConfigError(f"model.remat (level {l}): must be True or False, got {r!r}")
    _positive("model.top_latent_dim", self.top_latent_dim)
    _positive("model.width", self.width)
    _positive("model.blocks_per_level", self.blocks_per_level, allow_zero=True)
    _positive("model.merge_blocks", self.merge_blocks, allow_zero=True)
    for name in ("head_clamp", "likelihood_mean_clamp"):
      c = getattr(self, name)
      _positive(f"model.{name}", c, allow_zero=True)
      if not math.isfinite(c):
        raise ConfigError(f"model.{name}: must be finite (0 = off), got {c}")
    _positive("model.num_mixtures", self.num_mixtures)
    if self.level_widths and len(self.level_widths) != L:
      raise ConfigError(f"model.level_widths: has {len(self.level_widths)} entries for {L} levels")
    for name in ("latent_channels", "dropout", "sigma_floor"):
      value = getattr(self, name)
      field = f"model.{name}" if name == "latent_channels" else f"regularize.{name}"
      if len(value) != L:
        raise ConfigError(f"{field}: has {len(value)} entries for {L} levels")
    for l, c in enumerate(self.latent_channels[:-1], start=1):
      _positive(f"model.latent_channels (level {l})", c)
    if self.latent_groups and len(self.latent_groups) != L:
      raise ConfigError(
          f"model.latent_groups: has {len(self.latent_groups)} entries for {L} levels")
    _choice("model.latent_group_layout", self.latent_group_layout, LATENT_GROUP_LAYOUTS)
    for l, (g, c) in enumerate(zip(self.latent_groups[:-1], self.latent_channels), start=1):
      _positive(f"model.latent_groups (level {l})", g)
      if self.latent_group_layout == "space":
        if g not in SPACE_GROUPS:
          raise ConfigError(f"model.latent_groups (level {l}): the 'space' layout draws a level "
                            f"in 1, 2 or 4 position groups, got {g}")
      elif c % g:
        raise ConfigError(f"model.latent_groups (level {l}): {g} groups do not divide "
                          f"model.latent_channels = {c}; give a divisor of {c}")
    for l, w in enumerate(self.level_widths, start=1):
      _positive(f"model.level_widths (level {l})", w, allow_zero=True)
    for l, p in enumerate(self.dropout, start=1):
      if not 0.0 <= p < 1.0:
        raise ConfigError(f"regularize.dropout (level {l}): must be in [0, 1), got {p}")
    for l, s in enumerate(self.sigma_floor, start=1):
      _positive(f"regularize.sigma_floor (level {l})", s, allow_zero=True)
    for name in ("posterior_dropout", "posterior_noise"):
      value = getattr(self, name)
      if value and len(value) != L:
        raise ConfigError(f"regularize.{name}: has {len(value)} entries for {L} levels")
    for l, p in enumerate(self.posterior_dropout, start=1):
      if not 0.0 <= p < 1.0:
        raise ConfigError(f"regularize.posterior_dropout (level {l}): must be in [0, 1), got {p}")
    for l, s in enumerate(self.posterior_noise, start=1):
      _positive(f"regularize.posterior_noise (level {l})", s, allow_zero=True)

  @classmethod
  def from_config(cls, config) -> ModelConfig:
    """Builds the model config from the full experiment config (`model` and `regularize`)."""
    m = config.model
    L = m.num_levels
    if not isinstance(L, int) or not 1 <= L <= MAX_LEVELS:
      raise ConfigError(f"model.num_levels: must be an integer in 1..{MAX_LEVELS}, got {L!r}")
    reg = config.get("regularize", {})
    region = m.get("likelihood_region", "all")
    train_mask = config.get("data", {}).get("train_mask", "centre")
    if region != "all" and train_mask != region:  # a region is named after the mask it bounds
      # The crop path needs every training hole inside the box; only the matching fixed mask
      # guarantees it before training starts (objective.elbo_terms guards every batch too).
      raise ConfigError(
          f"model.likelihood_region: {region!r} scores only the pixels of that box, but "
          f"data.train_mask = {train_mask!r} has holes outside it; use "
          f"model.likelihood_region='all' (the mask-agnostic path) or data.train_mask={region!r}")
    return cls(
        kind=m.kind, num_levels=L, posterior=m.posterior, context_skips=bool(m.context_skips),
        top_prior=m.top_prior, posterior_sees_mask=bool(m.posterior_sees_mask),
        latent_channels=per_level("model.latent_channels", m.latent_channels, L, int),
        latent_groups=per_level("model.latent_groups", m.get("latent_groups", (1,)), L, int),
        latent_group_layout=m.get("latent_group_layout", "channels"),
        top_latent_dim=int(m.top_latent_dim), width=int(m.width),
        level_widths=per_level("model.level_widths", m.get("level_widths", (0,)), L, int),
        blocks_per_level=int(m.blocks_per_level), merge_blocks=int(m.get("merge_blocks", 0)),
        head_clamp=float(m.get("head_clamp", 0.0)),
        upsample=m.get("upsample", "nearest"),
        hole_fill=m.get("hole_fill", "zeros"),
        fill_residual=_strict_bool(m.get("fill_residual", False)), likelihood=m.likelihood,
        num_mixtures=int(m.num_mixtures),
        likelihood_mean_clamp=float(m.get("likelihood_mean_clamp", 0.0)),
        likelihood_grad=m.get("likelihood_grad", "exact"),  # runs saved before the key: exact
        likelihood_grad_anneal=tuple(int(t) for t in m.get("likelihood_grad_anneal", ()) or ()),
        dropout=per_level("regularize.dropout", reg.get("dropout", (0.0,)), L),
        sigma_floor=per_level("regularize.sigma_floor", reg.get("sigma_floor", (0.0,)), L),
        posterior_dropout=per_level("regularize.posterior_dropout",
                                    reg.get("posterior_dropout", (0.0,)), L),
        posterior_noise=per_level("regularize.posterior_noise",
                                  reg.get("posterior_noise", (0.0,)), L),
        likelihood_region=region, compute_dtype=m.get("compute_dtype", "float32"),
        remat=per_level("model.remat", m.get("remat", (False,)), L, _strict_bool))

  @property
  def has_latents(self) -> bool:
    return self.kind == "hvae"

  def level_width(self, level: int) -> int:
    """Channels of the features h_l / d_l at level `level` (0 = 64x64: `width`)."""
    if level == 0 or not self.level_widths:
      return self.width
    return self.level_widths[level - 1] or self.width

  def groups(self, level: int) -> int:
    """How many latent groups z_level is drawn in (`model.latent_groups`; 1 at the top)."""
    if level == self.num_levels or not self.latent_groups:
      return 1
    return self.latent_groups[level - 1]

  def group_channels(self, level: int) -> int:
    """Channels of one latent group of 2-D level `level`: all of them in the "space" layout."""
    channels = self.latent_channels[level - 1]
    return channels if self.latent_group_layout == "space" else channels // self.groups(level)

  def resolution(self, level: int) -> int:
    """Spatial size of the features h_l / d_l at level `level` (0 = the 64x64 input)."""
    return IMAGE_SIZE // 2**level

  def latent_shape(self, level: int) -> tuple[int, ...]:
    """Shape of z_level for one example: (r, r, c) for 2-D levels, (top_latent_dim,) at the top."""
    if level == self.num_levels:
      return (self.top_latent_dim,)
    r = self.resolution(level)
    return (r, r, self.latent_channels[level - 1])


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the training loss (never of reported figures). Tuples are indexed by level - 1."""

  kl_weight: tuple[float, ...]
  free_bits: tuple[float, ...]
  kl_warmup_steps: int = 0
  kl_balancing: bool = False
  free_bits_per: str = "level"  # level | channel
  # frozen: below its floor a level gets no KL gradient at all; learns: its prior still does
  free_bits_prior: str = "frozen"
  head_weight_decay: tuple[float, ...] = ()  # from config.regularize, per level
  # Encoder-only remedies (config.regularize, per level; () = off): L2 on the posterior head
  # kernels alone, and the weight of the sleep term (hvae/remedies.py).
  posterior_head_weight_decay: tuple[float, ...] = ()
  sleep_weight: tuple[float, ...] = ()

  def __post_init__(self):
    _choice("loss.free_bits_per", self.free_bits_per, ("level", "channel"))
    _choice("loss.free_bits_prior", self.free_bits_prior, FREE_BITS_PRIORS)
    for name in ("head_weight_decay", "posterior_head_weight_decay", "sleep_weight"):
      for l, w in enumerate(getattr(self, name), start=1):
        _positive(f"regularize.{name} (level {l})", w, allow_zero=True)
    for l, w in enumerate(self.kl_weight, start=1):
      _positive(f"loss.kl_weight (level {l})", w, allow_zero=True)
    for l, f in enumerate(self.free_bits, start=1):
      _positive(f"loss.free_bits (level {l})", f, allow_zero=True)
    _positive("loss.kl_warmup_steps", self.kl_warmup_steps, allow_zero=True)

  @classmethod
  def from_config(cls, config) -> LossConfig:
    L = config.model.num_levels
    lo = config.loss
    reg = config.get("regularize", {})
    return cls(kl_weight=per_level("loss.kl_weight", lo.kl_weight, L),
               free_bits=per_level("loss.free_bits", lo.free_bits, L),
               kl_warmup_steps=int(lo.kl_warmup_steps), kl_balancing=bool(lo.kl_balancing),
               free_bits_per=lo.get("free_bits_per", "level"),
               free_bits_prior=lo.get("free_bits_prior", "frozen"),
               head_weight_decay=per_level("regularize.head_weight_decay",
                                           reg.get("head_weight_decay", (0.0,)), L),
               posterior_head_weight_decay=per_level(
                   "regularize.posterior_head_weight_decay",
                   reg.get("posterior_head_weight_decay", (0.0,)), L),
               sleep_weight=per_level("regularize.sleep_weight", reg.get("sleep_weight", (0.0,)),
                                      L))
