"""`--mode=inpaint`: fill in holes of the user's own images with a trained run.

  python launch.py --mode=inpaint --workdir=runs/quickstart --input=photo.jpg --output=out/
      [--mask=centre|boxes|freeform|box:X,Y,W,H|PATH] [--num_samples=4] [--temperature=0.8]
      [--rank] [--checkpoint=best|latest|STEP]

Inputs: one image file or a folder (searched recursively; hidden files and folders skipped).
Each image, of any size and mode, is decoded by content and cropped/resized to 64x64 exactly
as the `folder` data source does (hvae.data.images: EXIF orientation, alpha on white, the
largest centred square, antialiased bicubic resize; images under 64 px follow
`data.small_images`). A file that cannot be decoded is named in a warning and skipped.

Masks (1 = given, 0 = missing, on the 64x64 model image):
* `centre` (default), `boxes`, `freeform`: the evaluation masks, the i-th input getting the
  evaluation mask of index i;
* `box:X,Y,W,H`: the rectangle with top-left corner (X, Y) and size W x H px is missing;
* PATH: a mask image, cropped and resized like the inputs (so a mask of the input's size lines
  up with it), then thresholded: BLACK (< 128 in greyscale) = MISSING, white = given.

Outputs in OUT, for each input NAME (its relative path with "/" replaced by "__", without
extension): NAME_input.png (the 64x64 image the model saw), NAME_context.png (the input with
its hole grey), NAME_fill_1.png ... NAME_fill_N.png (each fill-in composited into the context:
given pixels are the input's, bit for bit); grid.png (one row per input: context | input |
fill-ins) and results.json. With --rank the fill-ins are ordered by the model's IW bound on
log p(fill-in | context) (K = `RANK_SAMPLES`), most likely first, and the bounds (bits per
missing dim, lower = more likely) are in results.json.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from hvae import api, images, objective
from hvae.data import images as image_io
from hvae.data import masks as masks_lib
from hvae.modes.evaluate import RANK_SAMPLES, parse_temperature

SIZE = 64
MAX_BATCH = 16  # inputs per compiled call; a short last batch is padded (one compile)


def list_inputs(path: str) -> list[tuple[str, str]]:
  """[(name, file path)] of an image file or of every non-hidden file under a folder, sorted."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input: {path} does not exist")
  if os.path.isfile(path):
    return [(os.path.splitext(os.path.basename(path))[0], path)]
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(f for f in files if not f.startswith(".")):
      rel = os.path.relpath(os.path.join(root, name), path)
      found.append((os.path.splitext(rel)[0].replace(os.sep, "__"), os.path.join(root, name)))
  return sorted(found)


def load_image(path: str, small_images: str = "upscale") -> np.ndarray | None:
  """uint8 [64, 64, 3] by the data pipeline's policy, or None (with a warning naming the file)."""
  try:
    image = image_io.decode_file(path)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = a bad file)
    logging.warning("inpaint: skipping %s: cannot decode (%s: %s)", path, type(e).__name__, e)
    return None
  if min(image.size) < SIZE and small_images == "skip":
    logging.warning("inpaint: skipping %s: smaller than %d px (data.small_images='skip')", path,
                    SIZE)
    return None
  return image_io.centre_crop_resize(image, SIZE)


def _box_mask(spec: str) -> np.ndarray:
  try:
    x, y, w, h = (int(v) for v in spec.split(":", 1)[1].split(","))
  except ValueError:
    raise ValueError(f"--mask: {spec!r} is not box:X,Y,W,H (integers)") from None
  if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > SIZE or y + h > SIZE:
    raise ValueError(f"--mask: box {spec!r} must lie inside the {SIZE}x{SIZE} image")
  mask = np.ones((SIZE, SIZE, 1), np.float32)
  mask[y:y + h, x:x + w] = 0.0
  return mask


def mask_from_file(path: str) -> np.ndarray:
  """float32 [64, 64, 1] from a mask image: cropped/resized like inputs; black = missing."""
  grey = image_io.decode_file(path).convert("L")
  square = grey.crop(image_io.centre_square_box(grey.width, grey.height))
  if square.size != (SIZE, SIZE):
    square = square.resize((SIZE, SIZE), image_io.RESAMPLE)
  return (np.asarray(square, np.float32) >= 128).astype(np.float32)[..., None]


def make_masks(spec: str | None, count: int, seed: int) -> np.ndarray:
  """[count, 64, 64, 1] masks for the inputs from a --mask value (see the module docstring)."""
  spec = spec or "centre"
  if spec in masks_lib.MASKS:
    return np.stack([masks_lib.eval_mask(spec, seed, i, SIZE) for i in range(count)])
  if spec.startswith("box:"):
    mask = _box_mask(spec)
  elif os.path.isfile(spec):
    mask = mask_from_file(spec)
  else:
    raise ValueError(f"--mask: {spec!r} is not one of {', '.join(masks_lib.MASKS)}, "
                     "box:X,Y,W,H or an existing mask image")
  missing = 1.0 - mask.mean()
  if missing == 0.0:
    logging.warning("inpaint: the mask %s has no missing (black) pixel: nothing to fill", spec)
  elif missing == 1.0:
    logging.warning("inpaint: the mask %s leaves no context: fill-ins are unconditional", spec)
  return np.repeat(mask[None], count, axis=0)


def _padded_batches(n: int, size: int):
  """(index array of length `size`, number of real rows) covering 0..n-1; pads by repeating."""
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    yield np.minimum(idx, n - 1), min(size, n - start)


def run(workdir: str, input_path: str, output: str, config=None, *, mask: str | None = None,
        num_samples: int = 4, temperature: float | Sequence[float] | str = 1.0,
        rank: bool = False, checkpoint: str | int = "best", ema: bool = True) -> dict:
  """Fills in the holes of the images at `input_path` and writes PNGs to `output`.

  Args:
    workdir: the trained run.
    input_path: an image file or a folder of images.
    output: output folder (created).
    config: the experiment config (default WORKDIR/config.json).
    mask: centre | boxes | freeform | box:X,Y,W,H | a mask image path (black = missing).
    num_samples: N fill-ins per image.
    temperature: tau, global or per level (or a string for `parse_temperature`).
    rank: order the fill-ins by the model's likelihood bound, most likely first.
    checkpoint: "best", "latest" or a step.
    ema: use the EMA parameters.

  Returns:
    The results dict written to OUTPUT/results.json.
  """
  t0 = time.perf_counter()
  temperature = parse_temperature(temperature)
  model = api.load(workdir, checkpoint, ema, config=config)
  entries, pixels = [], []
  for name, path in list_inputs(input_path):
    image = load_image(path, model.config.data.get("small_images", "upscale"))
    if image is not None:
      entries.append((name, path))
      pixels.append(image)
  if not pixels:
    raise ValueError(f"--input: no readable image in {input_path}")
  pixels = np.stack(pixels)
  masks = make_masks(mask, len(pixels), int(model.config.seed))
  rng = jax.random.PRNGKey(int(model.config.seed))
  fills = np.zeros((num_samples,) + pixels.shape, np.uint8)
  scores = np.zeros((num_samples, len(pixels)))
  batch = min(MAX_BATCH, len(pixels))
  for i, (idx, real) in enumerate(_padded_batches(len(pixels), batch)):
    keys = jax.random.split(jax.random.fold_in(rng, i))
    f = model.fill_in(pixels[idx], masks[idx], n=num_samples, temperature=temperature,
                      seed=keys[0])
    fills[:, idx[:real]] = f[:, :real]
    if rank:
      flat = f.reshape((-1,) + f.shape[2:])
      s = model.score(flat, np.tile(masks[idx], (num_samples, 1, 1, 1)), k=RANK_SAMPLES,
                      seed=keys[1]).reshape(num_samples, -1)
      scores[:, idx[:real]] = s[:, :real]
  if rank:
    order = np.argsort(-scores, axis=0, kind="stable")
    fills = np.take_along_axis(fills, order[..., None, None, None], axis=0)
    scores = np.take_along_axis(scores, order, axis=0)

  os.makedirs(output, exist_ok=True)
  context = images.hole_overlay(pixels, masks)
  num_dims = 3.0 * np.sum(masks[..., 0] < 0.5, axis=(1, 2))
  records = []
  for b, (name, path) in enumerate(entries):
    files = {"input": f"{name}_input.png", "context": f"{name}_context.png",
             "fills": [f"{name}_fill_{i + 1}.png" for i in range(num_samples)]}
    images.save_png(os.path.join(output, files["input"]), pixels[b])
    images.save_png(os.path.join(output, files["context"]), context[b])
    for i, file in enumerate(files["fills"]):
      images.save_png(os.path.join(output, file), fills[i, b])
    record = {"name": name, "source": os.path.abspath(path), "files": files,
              "missing_pixels": int(num_dims[b] // 3)}
    if rank:
      record["bpd"] = (-scores[:, b] / (max(num_dims[b], 1.0) * objective.LN2)).tolist()
    records.append(record)
  rows = [np.concatenate([context[b][None], pixels[b][None], fills[:, b]])
          for b in range(len(entries))]
  labels = ["context", "input"] + [f"{'rank' if rank else 'fill'} {i + 1}"
                                   for i in range(num_samples)]
  images.save_png(os.path.join(output, "grid.png"), images.make_grid(rows, labels=labels,
                                                                     scale=2))
  results = {"workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
             "checkpoint_step": model.step, "ema": ema, "mask": mask or "centre",
             "num_samples": num_samples, "temperature": temperature, "ranked": rank,
             "rank_samples": RANK_SAMPLES if rank else None, "images": records,
             "wall_time_s": time.perf_counter() - t0}
  with open(os.path.join(output, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  logging.info("inpaint: %d image(s), %d fill-in(s) each, written to %s (%.1fs)", len(entries),
               num_samples, output, time.perf_counter() - t0)
  return results
