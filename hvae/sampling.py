"""Fill-ins (DESIGN §2 "Fill-ins"): samples, the mean fill-in and the mode fill-in.

A sample draws every latent from the conditional prior (temperature tau scales the prior
sigma, globally or per level) and then the pixels from the likelihood. The missing pixels of
the input are never read: the image is masked before it reaches the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hvae.model.ladder import HVAE, PRIOR


def composite(image: jnp.ndarray, fill: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Given pixels from `image`, missing ones from `fill`; all [..., 64, 64, 3], mask [..., 1]."""
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.asarray(image, jnp.float32) * mask + jnp.asarray(fill, jnp.float32) * (1.0 - mask)


def sample_fill_ins(
    model: HVAE, params, image, mask, rng: jax.Array, *, num_samples: int = 1,
    temperature: float | Sequence[float] = 1.0, pixel_temperature: float = 1.0,
    noise: Sequence[jnp.ndarray | None] | None = None,
) -> jnp.ndarray:
  """Draws `num_samples` fill-ins per context, composited into the context.

  Args:
    model: the model.
    params: its parameters.
    image: [B, 64, 64, 3] pixels in [0, 255]; missing pixels are ignored.
    mask: [B, 64, 64, 1], 1 = given.
    rng: PRNG key.
    num_samples: N.
    temperature: tau for the latents, global or per level.
    pixel_temperature: temperature of the pixel likelihood's sampler.
    noise: optional per-level eps of shape [N * B, *S] (sample-major) to fix latent noise.

  Returns:
    [N, B, 64, 64, 3] float32 composites with integer values in [0, 255].
  """
  batch = image.shape[0]
  context = composite(image, jnp.zeros_like(image, jnp.float32), mask)
  tiled = jnp.tile(context, (num_samples, 1, 1, 1))
  tiled_mask = jnp.tile(jnp.asarray(mask, jnp.float32), (num_samples, 1, 1, 1))
  latent_rng, pixel_rng = jax.random.split(rng)
  out = model.apply({"params": params}, tiled, tiled_mask, sources=PRIOR, noise=noise,
                    temperature=temperature, compute_posterior=False,
                    rngs={"sample": latent_rng})
  pixels = model.likelihood.sample(out.px_params, pixel_rng, pixel_temperature)
  filled = composite(tiled, pixels, tiled_mask)
  return filled.reshape((num_samples, batch) + filled.shape[1:])


def mode_fill_in(model: HVAE, params, image, mask) -> jnp.ndarray:
  """The mode fill-in: prior means for every latent and the likelihood's mode. [B, 64, 64, 3]."""
  context = composite(image, jnp.zeros_like(image, jnp.float32), mask)
  noise = None
  if model.config.has_latents:
    # Zero noise = the prior mean of every level; no RNG is consumed for the latents.
    shapes = [model.config.latent_shape(l) for l in range(1, model.config.num_levels + 1)]
    noise = [jnp.zeros((image.shape[0],) + s, jnp.float32) for s in shapes]
  out = model.apply({"params": params}, context, mask, sources=PRIOR, noise=noise,
                    compute_posterior=False, rngs={"sample": jax.random.PRNGKey(0)})
  return composite(context, model.likelihood.mode(out.px_params), mask)


def mean_fill_in(samples: jnp.ndarray) -> jnp.ndarray:
  """The mean fill-in: the average of N composited samples [N, B, ...] -> [B, ...]."""
  return jnp.mean(samples, axis=0)
