"""Fill-ins (docs/design.md §2 "Fill-ins"): samples, the mean fill-in and the mode fill-in.

A sample draws every latent from the conditional prior (temperature tau scales the prior
sigma, globally or per level) and then the pixels: `pixels="sample"` draws them from the
likelihood p(x | z) (the definition of the design), `pixels="mean"` takes its mean E[x | z], so
every difference between two samples comes from the latents (as VAE papers show samples), and
`pixels="sample:T"` draws them at pixel temperature T (the likelihood's noise scaled by T and a
mixture's component drawn from softmax(logits / T): T -> 0 is the likelihood's mode, T = 1 the
likelihood), between the two: grain without the speckle of T = 1 (docs/results.md, "Pixel
temperature"). The missing
pixels of the input are never read: the image is masked before it reaches the model.

* `sample_fill_ins`: N samples; `mean_fill_in` averages them (pixel noise included). With
  `pixels="mean"` the samples are the likelihood's MEAN E[x | z] for N latent draws, and their
  average (`hvae.load(...).mean`) is a Monte-Carlo estimate of E[x_inner | x_outer] (at
  tau = 1) without the pixel noise.
* `mode_fill_in`: every latent at its prior mean, the pixels at the likelihood's mode.

`DEFAULT_TEMPERATURE` and `DEFAULT_PIXELS` are the one default of every mode, the API and
`eval.temperature` / `eval.pixels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hvae.errors import ConfigError
from hvae.model.ladder import HVAE, PRIOR

# The defaults of --mode=eval, --mode=inpaint, hvae.load(...) and the training grids (when
# eval.temperature / eval.pixels are ''), chosen from the measured sweep in docs/evaluation.md
# ("Choosing the temperature"): with pixels drawn from the likelihood, samples of a CPU-trained
# model are speckle (hf_ratio ~6, -3 dB PSNR); with its mean E[x | z] every difference between
# samples is the latents', and tau = 1 gives them the most detail (hf_ratio closest to 1) for
# -0.4 dB PSNR against tau = 0, best-of-8 above the mode, and is the likelihood's own tau.
DEFAULT_TEMPERATURE = 1.0
PIXELS = ("sample", "mean")  # and "sample:T", T a pixel temperature in [0, 2]
DEFAULT_PIXELS = "mean"


def parse_pixels(value: str) -> tuple[str, float]:
  """("sample" | "mean", pixel temperature) of a `pixels` value: "mean", "sample" (T = 1) or
  "sample:T" with 0 <= T <= 2.

  Raises:
    ConfigError: any other value, naming the choices.
  """
  name, _, temp = str(value).partition(":")
  if name in PIXELS and not (temp and name == "mean"):
    try:
      t = float(temp) if temp else 1.0
    except ValueError:
      t = -1.0
    if 0.0 <= t <= 2.0:
      return name, t
  raise ConfigError(f"pixels: {value!r} is not one of {', '.join(PIXELS)} or sample:T with "
                    "a pixel temperature 0 <= T <= 2 (e.g. sample:0.3)")


def check_pixels(value: str) -> str:
  """`value` if it is a valid `pixels` value (see `parse_pixels`), else a ConfigError."""
  parse_pixels(value)
  return value


def default_pixels(config=None) -> str:
  """The run's `eval.pixels` when set, else `DEFAULT_PIXELS`."""
  value = ""
  if config is not None and "eval" in config:
    value = config.eval.get("pixels", "") or ""
  return check_pixels(value) if value else DEFAULT_PIXELS


def composite(image: jnp.ndarray, fill: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Given pixels from `image`, missing ones from `fill`; all [..., 64, 64, 3], mask [..., 1]."""
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.asarray(image, jnp.float32) * mask + jnp.asarray(fill, jnp.float32) * (1.0 - mask)


def sample_fill_ins(
    model: HVAE, params, image, mask, rng: jax.Array, *, num_samples: int = 1,
    temperature: float | Sequence[float] = 1.0,
    noise: Sequence[jnp.ndarray | None] | None = None, pixels: str = "sample",
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
    noise: optional per-level eps of shape [N * B, *S] (sample-major) to fix latent noise.
    pixels: "sample" (from the likelihood), "sample:T" (at pixel temperature T) or "mean"
      (E[x | z]).

  Returns:
    [N, B, 64, 64, 3] float32 composites in [0, 255] (integer values for pixels="sample...").
  """
  batch = image.shape[0]
  context = composite(image, jnp.zeros_like(image, jnp.float32), mask)
  tiled = jnp.tile(context, (num_samples, 1, 1, 1))
  tiled_mask = jnp.tile(jnp.asarray(mask, jnp.float32), (num_samples, 1, 1, 1))
  latent_rng, pixel_rng = jax.random.split(rng)
  out = model.apply({"params": params}, tiled, tiled_mask, sources=PRIOR, noise=noise,
                    temperature=temperature, compute_posterior=False,
                    rngs={"sample": latent_rng})
  kind, pixel_temperature = parse_pixels(pixels)
  if kind == "mean":
    values = model.likelihood.mean(out.px_params)
  else:
    values = model.likelihood.sample(out.px_params, pixel_rng, pixel_temperature)
  filled = composite(tiled, values, tiled_mask)
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


def parse_temperature(text: str | float | Sequence[float]) -> float | tuple[float, ...]:
  """"0.8" -> 0.8 (every level); "0.5,0.8,1" -> a per-level tuple (level 1 = finest first)."""
  if isinstance(text, int | float):
    return float(text)
  if not isinstance(text, str):
    return tuple(float(t) for t in text)
  try:
    values = tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise ConfigError(
        f"--temperature: {text!r} is not a number or a comma-separated list") from None
  if not values or any(v < 0 for v in values):
    raise ConfigError(f"--temperature: {text!r} must be one or more non-negative numbers")
  return values[0] if len(values) == 1 else values


def default_temperature(config=None) -> float | tuple[float, ...]:
  """The run's `eval.temperature` when set (a number or "TAU_1,...,TAU_L"), else the default."""
  value = ""
  if config is not None and "eval" in config:
    value = config.eval.get("temperature", "")
  if value is None or (isinstance(value, str) and not value.strip()):
    return DEFAULT_TEMPERATURE
  return parse_temperature(value)
