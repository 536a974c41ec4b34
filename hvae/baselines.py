"""Classical fill-ins a user would reach for instead of the model (host-side numpy, 0..255).

Every baseline takes one image [H, W, 3] (uint8 or floats in 0..255; the missing pixels are
never read) and its mask [H, W, 1] or [H, W] (1 = given, 0 = missing), and returns uint8
[H, W, 3]: the fill-in composited into the context, so the given pixels are the input's
exactly (floats are rounded).

* `biharmonic`: scikit-image's `inpaint_biharmonic` (each channel is the solution of the
  biharmonic equation with the given pixels as boundary values: smooth, reproduces linear ramps
  exactly), rounded and clipped to 0..255.
* `ring_mean`: the hole filled with one colour, the mean of its border ring: the given pixels
  4-adjacent to a missing one (the mean of every given pixel if the ring is empty, grey 128 if
  nothing is given).
* `pull_push`: the smooth fill the model's prior input holds with `model.hole_fill=pull_push`
  (`hvae.model.layers.pull_push_fill`: 2x2 weighted means down to 1x1, then bilinear back up,
  each level keeping its own colour with its weight): a convex combination of given pixels.
* `multiscale`: the fill of `model.hole_fill=multiscale` (`layers.multiscale_fill`): coarse to
  fine, a few conjugate-gradient steps of biharmonic smoothing per resolution from the
  upsampled coarser solution.
  Both run in JAX; an image whose sides are not one power of 2 is padded with missing pixels.

`BASELINES` names them for `--baselines=biharmonic,ring_mean` (`--mode=eval`, `--mode=inpaint`);
`fill_batch` applies one to a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from hvae.errors import ConfigError

NO_CONTEXT_GREY = 128.0  # the fill when no pixel is given


def _prepare(image, mask) -> tuple[np.ndarray, np.ndarray]:
  """(float64 [H, W, 3], missing bool [H, W]) from an image and a mask (1 = given)."""
  image = np.asarray(image, np.float64)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3]; got {image.shape}")
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  if mask.shape != image.shape[:2]:
    raise ValueError(f"mask {mask.shape} does not match image {image.shape}")
  return image, mask < 0.5


def _finish(image: np.ndarray, fill: np.ndarray, missing: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3]: `fill` on the missing pixels, `image` elsewhere; rounded, clipped."""
  out = np.where(missing[..., None], fill, image)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def biharmonic(image, mask) -> np.ndarray:
  """Biharmonic inpainting (scikit-image) of the missing pixels; arguments and result as every
  baseline's (module docstring)."""
  from skimage.restoration import inpaint_biharmonic  # imported on first use (slow to import)

  image, missing = _prepare(image, mask)
  if not missing.any():
    return _finish(image, image, missing)
  if missing.all():
    return _finish(image, np.full_like(image, NO_CONTEXT_GREY), missing)
  context = np.where(missing[..., None], 0.0, image)
  return _finish(image, inpaint_biharmonic(context, missing, channel_axis=-1), missing)


def border_ring(missing: np.ndarray) -> np.ndarray:
  """bool [H, W]: the given pixels with a 4-neighbour that is missing (the hole's 1-px border)."""
  near = np.zeros_like(missing)
  near[1:] |= missing[:-1]
  near[:-1] |= missing[1:]
  near[:, 1:] |= missing[:, :-1]
  near[:, :-1] |= missing[:, 1:]
  return near & ~missing


def ring_mean(image, mask) -> np.ndarray:
  """The hole filled with the mean colour of its border ring of given pixels; arguments and
  result as every baseline's (module docstring)."""
  image, missing = _prepare(image, mask)
  ring = border_ring(missing)
  if not ring.any():  # no pixel is missing, or none is given
    ring = ~missing
  colour = image[ring].mean(axis=0) if ring.any() else np.full(3, NO_CONTEXT_GREY)
  return _finish(image, np.broadcast_to(colour, image.shape), missing)


def pull_push(image, mask) -> np.ndarray:
  """The pull-push fill of the missing pixels; arguments and result as every baseline's (module
  docstring)."""
  return _jax_fill("pull_push_fill", image, mask)


def multiscale(image, mask) -> np.ndarray:
  """The multiscale fill of the missing pixels; arguments and result as every baseline's
  (module docstring)."""
  return _jax_fill("multiscale_fill", image, mask)


@functools.cache
def _jitted(name: str):
  """`hvae.model.layers.<name>`, jitted once (eagerly, its loops would recompile every call)."""
  import jax  # pylint: disable=g-import-not-at-top

  from hvae.model import layers  # pylint: disable=g-import-not-at-top

  return jax.jit(getattr(layers, name))


def _jax_fill(name: str, image, mask) -> np.ndarray:
  """`hvae.model.layers.<name>` on one image, padded to a power-of-2 square."""
  image, missing = _prepare(image, mask)
  if missing.all():
    return _finish(image, np.full_like(image, NO_CONTEXT_GREY), missing)
  h, w = missing.shape
  side = 1 << max(h - 1, w - 1, 7).bit_length()  # the next power of 2 >= both sides and 8
  x = np.zeros((1, side, side, 3), np.float32)
  m = np.zeros((1, side, side, 1), np.float32)
  x[0, :h, :w] = image / 127.5 - 1.0
  m[0, :h, :w, 0] = ~missing
  fill = np.asarray(_jitted(name)(x, m))[0, :h, :w]
  return _finish(image, (fill.astype(np.float64) + 1.0) * 127.5, missing)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "biharmonic": biharmonic,
    "ring_mean": ring_mean,
    "pull_push": pull_push,
    "multiscale": multiscale,
}
DEFAULT = "biharmonic,ring_mean"  # the --baselines default


def parse(text: str | Sequence[str] | None) -> tuple[str, ...]:
  """A --baselines value ("biharmonic,ring_mean", "none" or "") or a sequence of names -> the
  names, validated, in order, without repeats.

  Raises:
    ConfigError (a ValueError): an unknown name.
  """
  items = [] if text is None else text.split(",") if isinstance(text, str) else list(text)
  items = [t.strip() for t in items if t.strip()]
  if [t.lower() for t in items] in ([], ["none"]):
    return ()
  names = tuple(dict.fromkeys(items))
  unknown = [n for n in names if n not in BASELINES]
  if unknown:
    raise ConfigError(f"--baselines: {', '.join(unknown)} not one of {', '.join(BASELINES)} "
                     "(or none)")
  return names


def fill_batch(name: str, images, masks) -> np.ndarray:
  """Baseline `name` on every image: images [B, H, W, 3], masks [B, H, W, 1] -> uint8 [B, ...]."""
  fn = BASELINES[name]
  images, masks = np.asarray(images), np.asarray(masks)
  return np.stack([fn(images[b], masks[b]) for b in range(images.shape[0])])
