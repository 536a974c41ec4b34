"""Encoder-side remedies of the training loss: the sleep term and posterior-only weight decay.

The amortisation split (hvae/amortisation.py) says whether a level's held-out gap is the
encoder's (the posterior fits training images better than new ones) or the decoder's and
prior's. These terms act on the encoder alone; the decoder's remedies are the per-level ones of
`regularize` (dropout, sigma floor, head weight decay, KL weight, free bits) and augmentation
of what the likelihood is trained on (`data.flip`, random training masks `data.train_mask`).

* **Sleep term** (`regularize.sleep_weight`, per level; Zhang, Hayes & Barber 2022's "reverse
  half-asleep"): dream a completion from the model itself — z ~ p(z | x_outer) from the
  conditional prior, x_inner ~ p(x | z, x_outer) — and fit the posterior to the z that
  produced it: sleep = sum_l w_l * -log q(z_l | z_>l, x_dream), summed over the batch and
  normalised as the ELBO part of the loss is (by sum(D) ln 2), so w_l = 1 weighs one nat of it
  like one nat of the ELBO. The dream carries no gradient, and the term's gradient reaches
  only the parameters that serve the posterior alone (`POSTERIOR_ONLY`: every level's q_head
  and `posterior_mask_proj`): the trunk, the decoder and the prior, shared with the
  generative model, are frozen for it, so it cannot buy a better fit on dreams with a worse
  model of the data. Posterior samples are unlimited this way, so the encoder sees far more
  (x, z) pairs than the training set holds.
* **Posterior-only head weight decay** (`regularize.posterior_head_weight_decay`): L2 on level
  l's q_head kernels (`hvae.objective.head_weight_penalty` with `objective.POSTERIOR_HEADS`);
  `regularize.head_weight_decay` decays the q and p heads together.
* Both terms join the loss in `hvae.objective.loss`, the one place the loss is assembled; the
  train step binds the model, the batch and the sleep term's key into its `sleep_fn`.
* Posterior input dropout and noise (`regularize.posterior_dropout`, `posterior_noise`) live
  in the model (`hvae.model.ladder.Level.posterior`), where the features are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hvae import objective, sampling
from hvae.model.ladder import HVAE, PRIOR

POSTERIOR_ONLY = ("q_head", "posterior_mask_proj")  # path parts used by the posterior alone


def posterior_only(params):
  """`params` with a stop_gradient on every leaf that is not the posterior's alone."""
  def keep(path, x):
    key = jax.tree_util.keystr(path)
    return x if any(name in key for name in POSTERIOR_ONLY) else jax.lax.stop_gradient(x)

  return jax.tree_util.tree_map_with_path(keep, params)


def dream(model: HVAE, params, image, mask, rng) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
  """A completion drawn from the model given the context, and the latents that produced it.

  Args:
    model: the model.
    params: its parameters (no gradient flows through the dream).
    image: [B, 64, 64, 3] pixels in [0, 255]; the missing ones are never read.
    mask: [B, 64, 64, 1], 1 = given.
    rng: PRNG key.

  Returns:
    (x_dream [B, 64, 64, 3]: the given pixels, the missing ones sampled from p(x | z, x_outer);
    [z_1, ..., z_L] drawn from the conditional prior at temperature 1).
  """
  params = jax.lax.stop_gradient(params)
  latent_rng, pixel_rng = jax.random.split(rng)
  context = sampling.composite(image, jnp.zeros_like(image, jnp.float32), mask)
  out = model.apply({"params": params}, context, mask, sources=PRIOR, compute_posterior=False,
                    rngs={"sample": latent_rng})
  pixels = model.likelihood.sample(out.px_params, pixel_rng)
  x = sampling.composite(context, pixels, mask)
  return jax.lax.stop_gradient(x), [jax.lax.stop_gradient(lev.z) for lev in out.levels]


def sleep_loss(model: HVAE, params, image, mask, rng, weights, *, train: bool = True):
  """The sleep term of the loss and its per-level parts (see the module docstring).

  Args:
    model: the model.
    params: its parameters; only `POSTERIOR_ONLY` leaves get a gradient.
    image, mask: the training batch (its context is what the dream is conditioned on).
    rng: PRNG key (the dream, the posterior pass's dropout and dequantisation).
    weights: [L] per-level weights w_l (a level with w_l = 0 adds nothing).
    train: run the posterior pass in training mode (its dropout / noise remedies on).

  Returns:
    (loss scalar in bits per missing dim of the batch, [L] mean -log q(z_l | ...) in nats per
    image).
  """
  dream_rng, pass_rng, dropout_rng = jax.random.split(rng, 3)
  x, zs = dream(model, params, image, mask, dream_rng)
  out = model.apply({"params": posterior_only(params)}, x, mask, latents=zs,
                    compute_posterior=True, train=train,
                    rngs={"sample": pass_rng, "dropout": dropout_rng})
  nll = jnp.stack([-lev.log_q for lev in out.levels], axis=-1)  # [B, L] nats
  weights = jnp.asarray(weights, jnp.float32)
  num_dims = objective.elbo_terms(out, mask).num_dims
  loss = jnp.sum(nll * weights) / (jnp.sum(num_dims) * objective.LN2)
  return loss, jnp.mean(nll, axis=0)
