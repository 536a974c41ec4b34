"""The objective of docs/design.md §2: per-example negative ELBO terms, bits/dim, training loss.

Reported figures always use the *unweighted* bound (`ElboTerms`); the training loss
(`training_loss`) may weight (beta_l), clamp (free bits) and anneal (warm-up) the KL terms.
Bits/dim count only missing sub-pixels: D = 3 * |hole| per example, and dataset figures are
sum(nats) / (sum(D) ln 2), so recon_bpd + sum_l kl_bpd = bpd exactly.

`loss` is the one place the loss the train step differentiates is assembled from its terms: the
weighted ELBO part (`training_loss`, with free bits per level or channel and KL balancing), the
head weight penalties (`head_weight_penalty`) and the sleep term (`hvae.remedies.sleep_loss`,
passed in as a function so that this module builds no model pass of its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hvae import metric_names
from hvae.model.ladder import ModelOutput
from hvae.typed_config import LossConfig

LN2 = math.log(2.0)
HEADS = ("q_head", "p_head")  # the per-level parameters that per-level remedies address
POSTERIOR_HEADS = ("q_head",)  # the posterior's alone (`regularize.posterior_head_weight_decay`)


@flax.struct.dataclass
class ElboTerms:
  """Per-example terms of the unweighted negative ELBO, in nats."""

  recon: jnp.ndarray  # [B] -log p(x_inner | z, x_outer), summed over missing sub-pixels
  kl: jnp.ndarray  # [B, L] KL of every level per image (L = 0 for the deterministic kind)
  num_dims: jnp.ndarray  # [B] D, the number of missing sub-pixels

  @property
  def nelbo(self) -> jnp.ndarray:  # [B]
    return self.recon + self.kl.sum(-1)


def elbo_terms(out: ModelOutput, mask: jnp.ndarray) -> ElboTerms:
  """Reduces a forward pass to per-example ELBO terms.

  When `out.region` is set (the likelihood computed on a static box only), every missing pixel
  must lie in the box, or the terms of pixels outside it would be dropped silently. The function
  refuses instead: with a concrete mask it raises ValueError; under tracing (the jitted train
  step) the example's `recon` is NaN, so the loss is not finite, the update is skipped and a run
  that keeps doing it stops (`optim.max_consecutive_skips`). `ModelConfig.from_config` already
  rejects a `model.likelihood_region` whose `data.train_mask` could do it.

  Args:
    out: the model's output for (image, mask), latents from the posterior.
    mask: [B, 64, 64, 1], 1 = given.

  Returns:
    `ElboTerms`; the reconstruction ignores given pixels entirely. Terms are float32 whatever
    the model's compute dtype.

  Raises:
    ValueError: `out.region` is set and a concrete `mask` has missing pixels outside it.
  """
  missing = 1.0 - jnp.asarray(mask, jnp.float32)[..., 0]  # [B, 64, 64]
  num_dims = 3.0 * jnp.sum(missing, axis=(1, 2))
  log_px = jnp.asarray(out.log_px, jnp.float32)
  if out.region is None:
    recon = -jnp.sum(log_px * missing, axis=(1, 2))
  else:
    y0, y1, x0, x1 = out.region
    inside = missing[:, y0:y1, x0:x1]
    if inside.shape != log_px.shape:
      raise ValueError(f"log_px of shape {log_px.shape} does not cover region {out.region}")
    recon = -jnp.sum(log_px * inside, axis=(1, 2))
    outside = jnp.sum(missing, axis=(1, 2)) - jnp.sum(inside, axis=(1, 2))  # [B] exact counts
    if not isinstance(outside, jax.core.Tracer):
      if np.any(np.asarray(outside) > 0):
        raise ValueError(
            f"the likelihood was computed on region {out.region} (top, bottom, left, right) "
            f"only, but the mask has {int(np.max(np.asarray(outside)))} missing pixels outside "
            "it; use likelihood_region='all' (model.likelihood_region) for such masks")
    else:
      recon = jnp.where(outside > 0, jnp.nan, recon)
  batch = recon.shape[0]
  kls = [jnp.asarray(lev.kl, jnp.float32).reshape(batch, -1).sum(-1) for lev in out.levels]
  kl = jnp.stack(kls, axis=-1) if kls else jnp.zeros((batch, 0), recon.dtype)
  return ElboTerms(recon=recon, kl=kl, num_dims=num_dims)


def bits_per_dim(nats, num_dims):
  """Bits per missing sub-pixel: nats / (D ln 2), elementwise, with D floored at 1.

  The one conversion of every reported figure: per example (arrays [B]) or for a dataset
  (sum(nats), sum(D)). Numpy in, numpy out (its dtype kept); jax arrays and tracers stay jax.
  """
  xp = jnp if isinstance(nats, jax.Array) or isinstance(num_dims, jax.Array) else np
  return nats / (xp.maximum(num_dims, 1.0) * LN2)


def missing_dims(mask) -> np.ndarray:
  """D of each binary mask [B, 64, 64, 1] (1 = given) on the host: 3 x its missing pixels."""
  return 3.0 * np.sum(np.asarray(mask)[..., 0] < 0.5, axis=(1, 2))


def to_bpd(nats: jnp.ndarray, num_dims: jnp.ndarray):
  """Dataset bits/dim: sum(nats) / (sum(D) ln 2)."""
  return bits_per_dim(jnp.sum(nats), jnp.sum(num_dims))


def bpd_metrics(terms: ElboTerms) -> dict[str, jnp.ndarray]:
  """bpd, recon_bpd and every level's kl / kl_bpd (names of docs/design.md §7, without the split).

  Per-latent-dim KL needs the latent sizes and is added by the caller (`kl_per_dim`).
  """
  metrics = {"bpd": to_bpd(terms.nelbo, terms.num_dims),
             "recon_bpd": to_bpd(terms.recon, terms.num_dims)}
  for l in range(terms.kl.shape[-1]):
    metrics[metric_names.name("kl", level=l + 1)] = jnp.mean(terms.kl[:, l])
    metrics[metric_names.name("kl_bpd", level=l + 1)] = to_bpd(terms.kl[:, l], terms.num_dims)
  return metrics


def kl_balancing_coeffs(kl_per_dim: jnp.ndarray) -> jnp.ndarray:
  """NVAE's KL balancing coefficients (Vahdat & Kautz 2020, §3.2 / `kl_balancer` in their code).

  gamma_l is proportional to the batch-average KL per latent dimension of level l and is
  normalised so that sum_l gamma_l = L: levels that carry little information get a smaller KL
  penalty during warm-up, which keeps them from collapsing. No gradient flows through gamma.

  Args:
    kl_per_dim: [L] batch-mean KL of each level divided by its number of latent dimensions.

  Returns:
    [L] coefficients summing to L.
  """
  a = jax.lax.stop_gradient(kl_per_dim) + 0.01
  return a.shape[0] * a / jnp.sum(a)


def prior_kl(out: ModelOutput, per_channel: bool = False):
  """Each level's KL(stop_gradient(q) || p), batch-mean: [L], or per channel a list of L [C_l].

  Its value is the level's KL; its gradient reaches the prior alone (`loss.free_bits_prior`).
  """
  sg = jax.lax.stop_gradient
  kls = [jnp.asarray(type(lev.q)(sg(lev.q.mean), sg(lev.q.log_scale)).kl(lev.p), jnp.float32)
         for lev in out.levels]  # [B, *S] each
  if per_channel:
    return [jnp.mean(_channel_sums(kl), 0) for kl in kls]
  return jnp.stack([jnp.mean(kl.reshape(kl.shape[0], -1).sum(-1)) for kl in kls])


def _channel_sums(kl: jnp.ndarray) -> jnp.ndarray:
  """[B, *S] KL per latent dimension -> [B, C] summed over positions (the top: C = its dims)."""
  return kl.reshape(kl.shape[0], -1, kl.shape[-1]).sum(1)


def _prior_learns(term, kl_mean, floor, prior):
  """`term` plus, where `kl_mean` is below a floor > 0, prior - sg(prior): the value of `term`,
  the prior's gradient (`training_loss`, prior_kl)."""
  below = (floor > 0) & (kl_mean < floor)
  return term + jnp.where(below, prior - jax.lax.stop_gradient(prior), 0.0)


def training_loss(terms: ElboTerms, *, kl_weight, free_bits, beta=1.0, kl_channels=None,
                  kl_coeffs=None, prior_kl=None):
  """The weighted training loss, in bits per missing dim of the batch.

  loss = (sum_b recon_b + beta * B * sum_l c_l w_l * max(mean_b KL_l, lambda_l)) / (sum_b D_b ln 2)

  Free bits clamp the *batch-mean* KL of a level from below, so below lambda_l the level gets
  no KL gradient at all. With `kl_channels`, the clamp applies to each channel of a level
  separately (lambda_l per channel, NVAE/IAF-style groups). The normalisation uses the global
  batch, never the device count.

  With `prior_kl` (`loss.free_bits_prior = "learns"`), a level (or channel) below its floor adds
  `prior_kl - stop_gradient(prior_kl)`: the loss's value is unchanged, and the level's prior
  keeps learning to match the posterior (the gradient of KL(sg(q) || p)) while the level's
  posterior heads stay exempt (the prior's inputs are not stopped: the gradient reaches the
  decoder state and, through the samples it reads, the posteriors that drew them). Without it
  a level held near its floor trains its prior only on the batches where its KL ends above
  the floor, and samples drawn from that prior are what the decoder saw least.

  Args:
    terms: per-example terms of the global batch.
    kl_weight: [L] per-level weights beta_l (array or tuple).
    free_bits: [L] per-level floors lambda_l in nats per image (0 = off).
    beta: global KL coefficient (warm-up), a scalar.
    kl_channels: optional list of L arrays [B, C_l], each level's KL per channel (summed over
      positions): free bits are then applied per channel.
    kl_coeffs: optional [L] extra coefficients c_l (KL balancing), default 1.
    prior_kl: optional `prior_kl(out, per_channel=kl_channels is not None)` of the same pass.

  Returns:
    (loss scalar, kl_loss [L] the clamped, weighted per-level KL terms in nats per image).
  """
  kl_mean = jnp.mean(terms.kl, axis=0)  # [L]
  num_levels = kl_mean.shape[0]
  batch = terms.recon.shape[0]
  if num_levels == 0:  # the deterministic baseline: no latents, the loss is the reconstruction
    return jnp.sum(terms.recon) / (jnp.sum(terms.num_dims) * LN2), kl_mean
  free_bits = jnp.asarray(free_bits, kl_mean.dtype)
  if kl_channels is None:
    clamped = jnp.where(free_bits > 0, jnp.maximum(kl_mean, free_bits), kl_mean)
    if prior_kl is not None:
      clamped = _prior_learns(clamped, kl_mean, free_bits, prior_kl)
  else:
    def level_term(l, c):
      mean = jnp.mean(c, 0)  # [C]
      term = jnp.where(free_bits[l] > 0, jnp.maximum(mean, free_bits[l]), mean)
      if prior_kl is not None:
        term = _prior_learns(term, mean, free_bits[l], prior_kl[l])
      return jnp.sum(term)
    clamped = jnp.stack([level_term(l, c) for l, c in enumerate(kl_channels)])
  coeffs = jnp.ones_like(kl_mean) if kl_coeffs is None else kl_coeffs
  kl_loss = beta * coeffs * jnp.asarray(kl_weight, kl_mean.dtype) * clamped  # [L]
  loss = (jnp.sum(terms.recon) + batch * jnp.sum(kl_loss)) / (jnp.sum(terms.num_dims) * LN2)
  return loss, kl_loss


def kl_per_channel(out: ModelOutput) -> list[jnp.ndarray]:
  """Each level's KL per channel, [B, C_l] summed over positions (free bits per channel).

  The top level's vector latent counts every dimension as a channel.
  """
  return [_channel_sums(lev.kl) for lev in out.levels]


def warmup_kl_coeffs(out: ModelOutput, terms: ElboTerms, beta) -> jnp.ndarray:
  """KL balancing as NVAE applies it: `kl_balancing_coeffs` while beta < 1, then all 1.

  Each level's latent dimensions are read off its KL ([B, *S], one entry per dimension).
  """
  dims = jnp.asarray([math.prod(lev.kl.shape[1:]) for lev in out.levels], jnp.float32)
  gamma = kl_balancing_coeffs(jnp.mean(terms.kl, 0) / dims)
  return jnp.where(beta < 1.0, gamma, jnp.ones_like(gamma))


def head_weight_penalty(params, head_weight_decay, heads=HEADS) -> jnp.ndarray:
  """sum_l wd_l * ||level l's head kernels||^2 (biases are not decayed).

  `heads` names the heads decayed: the posterior and prior heads (`HEADS`, for
  `regularize.head_weight_decay`) or the posterior's alone (`POSTERIOR_HEADS`, for
  `regularize.posterior_head_weight_decay`).
  """
  total = jnp.zeros((), jnp.float32)
  for l, wd in enumerate(head_weight_decay, start=1):
    level = params.get(f"level_{l}", {}) if wd > 0 else {}
    # the level's own heads and those of its latent groups (level_l/group_g/q_head, ...)
    for path, x in jax.tree_util.tree_leaves_with_path(level):
      names = [getattr(k, "key", None) for k in path]
      if "kernel" in names and any(name in names for name in heads):
        total += wd * jnp.sum(jnp.square(x))
  return total


def loss(out: ModelOutput, mask: jnp.ndarray, params, *, beta, cfg: LossConfig,
         sleep_fn: Callable[[Any, tuple[float, ...]], jnp.ndarray] | None = None,
         ) -> tuple[jnp.ndarray, ElboTerms]:
  """The loss the train step differentiates (docs/design.md §2, "The training loss").

  loss = training_loss(terms; kl_weight, free bits per level or channel (the prior exempt from
                       them with free_bits_prior = "learns"), beta, KL balancing)
         + head_weight_penalty(HEADS; head_weight_decay)
         + head_weight_penalty(POSTERIOR_HEADS; posterior_head_weight_decay)
         + sleep_fn(params, sleep_weight)

  Every term that is off (weights all 0) adds nothing. The sleep term needs a pass of the model
  on a dream, so the caller binds the model, the batch and the term's key into `sleep_fn` (as
  `hvae.train.train_step` does around `hvae.remedies.sleep_loss`); the weights come from here.

  Args:
    out: the model's forward pass on the batch (latents from the posterior), made with `params`.
    mask: the batch's mask [B, 64, 64, 1], 1 = given.
    params: the model's parameters (the head penalties read them).
    beta: the KL warm-up coefficient, a scalar.
    cfg: the loss's weights.
    sleep_fn: `(params, weights [L]) -> scalar`, the sleep term in bits per missing dim of the
      batch; required when any `cfg.sleep_weight` is > 0.

  Returns:
    (loss scalar, the batch's unweighted `ElboTerms`, which the reported metrics use).

  Raises:
    ValueError: `cfg.sleep_weight` has a weight > 0 and `sleep_fn` is None.
  """
  terms = elbo_terms(out, mask)
  kl_channels = kl_per_channel(out) if cfg.free_bits_per == "channel" else None
  coeffs = warmup_kl_coeffs(out, terms, beta) if cfg.kl_balancing and out.levels else None
  learns = cfg.free_bits_prior == "learns" and out.levels and any(cfg.free_bits)
  total, _ = training_loss(terms, kl_weight=cfg.kl_weight, free_bits=cfg.free_bits, beta=beta,
                           kl_channels=kl_channels, kl_coeffs=coeffs,
                           prior_kl=prior_kl(out, kl_channels is not None) if learns else None)
  total = total + head_weight_penalty(params, cfg.head_weight_decay)
  if any(cfg.posterior_head_weight_decay):
    total = total + head_weight_penalty(params, cfg.posterior_head_weight_decay, POSTERIOR_HEADS)
  if any(cfg.sleep_weight):
    if sleep_fn is None:
      raise ValueError("regularize.sleep_weight is set but no sleep_fn was given")
    total = total + sleep_fn(params, cfg.sleep_weight)
  return total, terms
