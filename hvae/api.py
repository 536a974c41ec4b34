"""`hvae.load(workdir)`: a trained model for notebooks, `--mode=eval` and `--mode=inpaint`.

  import hvae
  model = hvae.load("runs/quickstart")            # best checkpoint, EMA parameters
  fills = model.fill_in(images, masks, n=8, temperature=0.8)   # uint8 [8, B, 64, 64, 3]
  mode = model.mode(images, masks)                # uint8 [B, 64, 64, 3], deterministic
  mean = model.mean(images, masks, n=8)           # uint8 [B, 64, 64, 3], average of E[x | z]
  figures = model.evaluate(images, masks, k=64)   # IW bound, ELBO, ESS per example

Images are uint8 (or floats in 0..255) [B, 64, 64, 3] or one [64, 64, 3]; masks are
[B, 64, 64, 1], [B, 64, 64] or one [64, 64(, 1)] shared by the batch, 1 = given, 0 = missing.
Every method is jitted once per shape (temperatures and keys are arguments, not constants), and
large requests are split into chunks of at most `max_rows` forward-pass rows. `temperature=None`
(the default) is the run's `eval.temperature`, or `hvae.sampling.DEFAULT_TEMPERATURE` when unset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from hvae import baselines, config_file, evaluation, iw, sampling
from hvae.checkpoint import Checkpointer
from hvae.errors import CheckpointUnavailableError
from hvae.model.ladder import HVAE
from hvae.objective import bits_per_dim, missing_dims
from hvae.train import create_optimizer, create_train_state
from hvae.typed_config import ModelConfig, per_level


def _images_and_masks(images, masks) -> tuple[np.ndarray, np.ndarray]:
  """Normalises shapes: images float32 [B, 64, 64, 3], masks float32 [B, 64, 64, 1] in {0, 1}."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  masks = np.asarray(masks, np.float32)
  if masks.ndim == 2 or (masks.ndim == 3 and masks.shape[-1] != 1):  # no channel axis
    masks = masks[..., None]
  if masks.ndim == 3:  # one mask for the whole batch
    masks = masks[None]
  masks = np.broadcast_to(masks, images.shape[:3] + (1,))
  if images.shape[1:] != (64, 64, 3):
    raise ValueError(f"images must be [B, 64, 64, 3] (or [64, 64, 3]); got {images.shape}")
  return images.astype(np.float32), (masks > 0.5).astype(np.float32)


def _key(seed: int | jax.Array) -> jax.Array:
  """A PRNG key from an int seed (Python or numpy) or a key."""
  return jax.random.PRNGKey(int(seed)) if isinstance(seed, int | np.integer) else seed


@functools.lru_cache(maxsize=16)
def _fill_fn(model: HVAE, num_samples: int, pixels: str = "sample"):
  def fn(params, image, mask, rng, temperature):
    return sampling.sample_fill_ins(model, params, image, mask, rng, num_samples=num_samples,
                                    temperature=temperature, pixels=pixels)
  return jax.jit(fn)


@functools.lru_cache(maxsize=4)
def _mode_fn(model: HVAE):
  return jax.jit(functools.partial(sampling.mode_fill_in, model))


def _to_uint8(fills: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Exactly the input where given (the composite already is; rounding guards float inputs)."""
  return np.clip(np.rint(np.where(mask > 0.5, image, fills)), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Inpainter:
  """A trained model: its config, the model and the parameters of one checkpoint.

  Attributes:
    config: the run's experiment config (ml-collections, locked).
    model: the `HVAE` module.
    params: the parameters (EMA by default).
    step: the checkpoint's training step.
    workdir: the run directory it came from.
    ema: whether `params` are the EMA parameters.
    max_rows: forward-pass rows per compiled call (samples x examples); bounds memory.
  """

  config: ml_collections.ConfigDict
  model: HVAE
  params: Any
  step: int
  workdir: str = ""
  ema: bool = True
  max_rows: int = iw.DEFAULT_MAX_ROWS

  def temperatures(self, temperature: float | Sequence[float] | None) -> tuple[float, ...]:
    """tau per level (a float broadcasts; a sequence must have one entry per level; None is the
    run's eval.temperature, else `sampling.DEFAULT_TEMPERATURE`).

    Raises:
      hvae.typed_config.ConfigError (a ValueError): a sequence of another length than 1 or L.
    """
    if temperature is None:
      temperature = sampling.default_temperature(self.config)
    return per_level("temperature", np.ravel(temperature).tolist(),
                     self.model.config.num_levels)

  def fill_in(self, images, masks, n: int = 4, temperature: float | Sequence[float] | None = None,
              seed: int | jax.Array = 0, pixels: str | None = None) -> np.ndarray:
    """Draws n fill-ins per context (latents from the conditional prior at temperature tau).

    Args:
      images: [B, 64, 64, 3] (or one image); the missing pixels are never read.
      masks: [B, 64, 64, 1] or one mask for all, 1 = given.
      n: fill-ins per context.
      temperature: tau, one for every level or one per level (level 1 = finest first); None =
        the run's eval.temperature or `sampling.DEFAULT_TEMPERATURE`.
      seed: an int or a PRNG key.
      pixels: "sample" (drawn from p(x | z)), "sample:T" (at pixel temperature T) or "mean"
        (E[x | z]: all variation from the latents); None = the run's eval.pixels, else
        `sampling.DEFAULT_PIXELS`.

    Returns:
      uint8 [n, B, 64, 64, 3]: fill-ins composited into the context; the given pixels equal the
      input's exactly.
    """
    image, mask = _images_and_masks(images, masks)
    rng = _key(seed)
    pixels = sampling.default_pixels(self.config) if pixels is None else (
        sampling.check_pixels(pixels))
    chunk = iw.chunk_size(n, image.shape[0], self.max_rows)
    fn = _fill_fn(self.model, chunk, pixels)
    tau = tuple(jnp.float32(t) for t in self.temperatures(temperature))
    parts = [fn(self.params, image, mask, jax.random.fold_in(rng, i), tau)
             for i in range(math.ceil(n / chunk))]
    fills = np.concatenate([np.asarray(p) for p in jax.device_get(parts)])[:n]
    return _to_uint8(fills, image[None], mask[None])

  def mode(self, images, masks) -> np.ndarray:
    """The mode fill-in: every latent at its prior mean, the pixels at the likelihood's mode.

    Deterministic (no seed, no temperature). Same arguments as `fill_in`.

    Returns:
      uint8 [B, 64, 64, 3], composited; the given pixels equal the input's exactly.
    """
    image, mask = _images_and_masks(images, masks)
    fills = np.concatenate([
        np.asarray(jax.device_get(_mode_fn(self.model)(self.params, image[i:i + self.max_rows],
                                                       mask[i:i + self.max_rows])))
        for i in range(0, image.shape[0], self.max_rows)])
    return _to_uint8(fills, image, mask)

  def mean(self, images, masks, n: int = 8, temperature: float | Sequence[float] | None = None,
           seed: int | jax.Array = 0) -> np.ndarray:
    """The mean fill-in: the likelihood's mean E[x | z] averaged over n latent draws.

    An estimate of E[x_inner | x_outer] (at temperature 1) without pixel noise: smooth where
    the samples disagree.

    Args:
      images: [B, 64, 64, 3] (or one image); the missing pixels are never read.
      masks: [B, 64, 64, 1] or one mask for all, 1 = given.
      n: latent draws averaged.
      temperature: tau of the latents, as in `fill_in`.
      seed: an int or a PRNG key.

    Returns:
      uint8 [B, 64, 64, 3] (the average rounded), composited into the context.
    """
    image, mask = _images_and_masks(images, masks)
    rng = _key(seed)
    chunk = iw.chunk_size(n, image.shape[0], self.max_rows)
    fn = _fill_fn(self.model, chunk, "mean")  # E[x | z] of each latent draw, not rounded
    tau = tuple(jnp.float32(t) for t in self.temperatures(temperature))
    parts = [fn(self.params, image, mask, jax.random.fold_in(rng, i), tau)
             for i in range(math.ceil(n / chunk))]
    draws = np.concatenate([np.asarray(p, np.float64) for p in jax.device_get(parts)])[:n]
    return _to_uint8(draws.mean(axis=0), image, mask)

  @staticmethod
  def baseline(name: str, images, masks) -> np.ndarray:
    """A classical fill-in (`hvae.baselines.BASELINES`: biharmonic, ring_mean), uint8 [B, ...]."""
    image, mask = _images_and_masks(images, masks)
    return baselines.fill_batch(name, image, mask)

  def elbo(self, images, masks, seed: int | jax.Array = 0) -> dict[str, np.ndarray]:
    """Per-example unweighted ELBO terms (one posterior sample, analytic KL), nats.

    Returns:
      {"recon": [B], "kl": [B, L], "num_dims": [B], "nelbo": [B], "recon_channels": [B, 3]}
      numpy arrays; recon_channels is recon by the chain rule: -log p(r), -log p(g | r),
      -log p(b | r, g).
    """
    image, mask = _images_and_masks(images, masks)
    rng = _key(seed)
    out = jax.device_get(evaluation.make_elbo_fn(self.model)(self.params, image, mask, rng))
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    out["nelbo"] = out["recon"] + out["kl"].sum(-1)
    return out

  def score(self, images, masks, k: int = 8, seed: int | jax.Array = 0,
            interrupt=None) -> np.ndarray:
    """The K-sample IW bound on log p(x_inner | x_outer) of each image, nats. Returns [B]."""
    return self.evaluate(images, masks, k=k, seed=seed, with_elbo=False,
                         interrupt=interrupt)["iw_log_px"]

  def evaluate(self, images, masks, k: int = 64, seed: int | jax.Array = 0,
               with_elbo: bool = True, interrupt=None) -> dict[str, np.ndarray]:
    """Likelihood figures of the true fill-ins: the K-sample IW bound, its ESS and the ELBO.

    Args:
      images: [B, 64, 64, 3] true images (the missing pixels are the ones scored).
      masks: [B, 64, 64, 1] or one mask, 1 = given.
      k: K, importance samples per example.
      seed: an int or a PRNG key.
      with_elbo: also compute the single-sample ELBO (analytic KL).
      interrupt: asked between the IW bound's chunks (`hvae.preemption`: raises
        `Interrupted` when it says True).

    Returns:
      Per-example numpy arrays: iw_log_px (nats, <= log p(x_inner | x_outer)), iw_bpd (bits per
      missing dim of -iw_log_px), iw_ess (in [1, K]), num_dims; with_elbo adds nelbo (nats),
      bpd, recon, recon_channels [B, 3] and kl [B, L].
    """
    image, mask = _images_and_masks(images, masks)
    rng = _key(seed)
    iw_rng, elbo_rng = jax.random.split(rng)
    est = iw.estimate(self.model, self.params, image, mask, iw_rng, k, max_rows=self.max_rows,
                      interrupt=interrupt)
    num_dims = missing_dims(mask)
    out = {"iw_log_px": est["log_px"], "iw_ess": est["ess"], "num_dims": num_dims,
           "iw_bpd": bits_per_dim(-est["log_px"], num_dims)}
    if with_elbo:
      terms = self.elbo(image, mask, elbo_rng)
      out.update(nelbo=terms["nelbo"], recon=terms["recon"], kl=terms["kl"],
                 recon_channels=terms["recon_channels"],
                 bpd=bits_per_dim(terms["nelbo"], num_dims))
    return out


def _restore_params(workdir: str, config, model: HVAE, checkpoint, ema: bool):
  """Reads one checkpoint's (EMA) parameters onto the first local device.

  A step that cannot be read is skipped with a warning and the next best (or next newest) step
  is used (`Checkpointer.restore`); only the state is read, so a damaged `data_state/` does not
  matter here.

  Raises:
    CheckpointUnavailableError: no checkpoint, no such step, or none that loads.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointUnavailableError(
        f"{workdir} has no checkpoints: train it first (python launch.py --workdir={workdir})")
  tx = create_optimizer(config)
  abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.PRNGKey(0)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  with Checkpointer(directory, read_only=True) as ckpt:
    if checkpoint in (None, "best") and ckpt.best_step() is None:
      logging.warning("No checkpoint in %s has eval metrics; using the latest one.", directory)
      checkpoint = "latest"
    state, _, step = ckpt.restore(target, checkpoint, data_state=False)
  return (state.ema_params if ema else state.params), int(step)


def load(workdir: str, checkpoint: str | int = "best", ema: bool = True, *,
         config: ml_collections.ConfigDict | None = None) -> Inpainter:
  """Loads a trained run for filling in and evaluating.

  Args:
    workdir: the run directory (with config.json and checkpoints/).
    checkpoint: "best" (lowest eval/bpd; the latest when no checkpoint was evaluated),
      "latest", or a step number.
    ema: use the EMA parameters (as evaluation does); False for the raw parameters.
    config: the experiment config to use instead of WORKDIR/config.json (its model section must
      match the checkpoint's).

  Returns:
    An `Inpainter` with `fill_in`, `mode`, `mean`, `baseline`, `evaluate`, `score` and `elbo`.
  """
  workdir = os.fspath(workdir)
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: is {workdir} a training run directory?")
    config = config_file.load_config(path)
  model = HVAE(ModelConfig.from_config(config))
  if isinstance(checkpoint, str) and checkpoint.isdigit():
    checkpoint = int(checkpoint)
  params, step = _restore_params(workdir, config, model, checkpoint, ema)
  logging.info("Loaded %s step %d (%s parameters).", workdir, step, "EMA" if ema else "raw")
  return Inpainter(config=config, model=model, params=params, step=step, workdir=workdir, ema=ema)
