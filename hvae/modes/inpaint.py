"""`--mode=inpaint`: fill in holes of the user's own images with a trained run.

Why one file past ~350 lines: reading any image file or folder, the masks, the fill-ins and
writing every output are one command whose file names must agree; the methods table it shares
with `--mode=eval` lives in hvae/modes/evaluate.py.

  python launch.py --mode=inpaint --workdir=runs/quickstart --input=photo.jpg --output=out/
      [--mask=centre|boxes|freeform|box:X,Y,W,H|PATH] [--num_samples=4] [--temperature=0.8]
      [--rank] [--fill=all|samples,mode,mean] [--baselines=biharmonic,ring_mean|none]
      [--checkpoint=best|latest|STEP]

Inputs: one image file or a folder (searched recursively; hidden files and folders skipped; every
file is tried, whatever its extension, so every format Pillow decodes is read, PNM
.pgm/.ppm/.pbm/.pnm included). Each image, of any size and mode, is decoded by content and
cropped/resized to 64x64 exactly as the `folder` data source does (hvae.data.image_files: EXIF
orientation, alpha on white, the largest centred square, antialiased bicubic resize; images under 64
px follow `data.small_images`). A file that cannot be decoded is named in a warning and skipped.

Masks (1 = given, 0 = missing, on the 64x64 model image):
* `centre` (default), `boxes`, `freeform`: the evaluation masks, the i-th input getting the
  evaluation mask of index i;
* `box:X,Y,W,H`: the rectangle with top-left corner (X, Y) and size W x H px is missing;
* PATH: a mask image, cropped and resized like the inputs (so a mask of the input's size lines
  up with it), then thresholded: BLACK (< 128 in greyscale) = MISSING, white = given.

Outputs in OUT, for each input NAME (its path relative to the folder, or its file name, WITH its
extension and with "/" replaced by "__": `a.jpg` and `a.png` write `a.jpg_mode.png` and
`a.png_mode.png`, never the same files): NAME_input.png (the 64x64 image the model saw),
NAME_context.png (the input with its hole grey), NAME_fill_1.png ... NAME_fill_N.png (each fill-in
composited into the context: given pixels are the input's, bit for bit); grid.png (one row per
input: context | input | fill-ins) and results.json. With --rank the fill-ins are ordered by the
model's IW bound on log p(fill-in | context) (K = `RANK_SAMPLES`), most likely first, and the bounds
(bits per missing dim, lower = more likely) are in results.json.

`--fill` (default `all` = samples,mode,mean) chooses what the model draws: the N samples
(NAME_fill_k.png), the mode fill-in (NAME_mode.png: latents at their prior means, pixels at the
likelihood's mode) and the mean fill-in (NAME_mean.png: the likelihood's mean averaged over N
latent draws). Each baseline of `--baselines` (default biharmonic,ring_mean; `none`) writes
NAME_BASELINE.png. The grid's columns: context | input | first baseline | mode | mean | fills.

When the inputs are complete images (every mask but a mask image: centre, boxes, freeform,
box:...), the hole's true pixels are known, so every method is scored as `--mode=eval` scores
it (psnr, ssim, l1, hf_ratio, seam; paired with the first baseline; with N >= 2 the samples'
coverage of the truth, `hvae.quality.coverage`): per image in
results.json (`figures` of each image, `methods` the means), the table printed and written to
OUT/table.md (with a per-image PSNR/SSIM table). A mask image marks what to remove: no scores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from hvae import api, atomic, baselines, grids, sampling
from hvae.data import image_files
from hvae.data import masks as masks_lib
from hvae.errors import ConfigError, MissingPathError
from hvae.modes import evaluate
from hvae.modes.evaluate import RANK_SAMPLES
from hvae.objective import bits_per_dim, missing_dims

SIZE = 64
MAX_BATCH = 16  # inputs per compiled call; a short last batch is padded (one compile)


def list_inputs(path: str) -> list[tuple[str, str]]:
  """[(name, file path)] of an image file or of every non-hidden file under a folder, sorted.

  A name is the file's path relative to the folder (its base name for a file), extension kept,
  with "/" replaced by "__", so no two inputs share output files; should two still collide
  ("x/a.png" and a file named "x__a.png"), the later one gets "~2", "~3", ... appended.

  Raises:
    MissingPathError (a FileNotFoundError): `path` does not exist.
  """
  if not os.path.exists(path):
    raise MissingPathError(f"--input: {path} does not exist")
  if os.path.isfile(path):
    return [(os.path.basename(path), path)]
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(f for f in files if not f.startswith(".")):
      rel = os.path.relpath(os.path.join(root, name), path)
      found.append((rel.replace(os.sep, "__"), os.path.join(root, name)))
  unique, seen = [], set()
  for name, file in sorted(found):
    candidate, n = name, 1
    while candidate in seen:
      n += 1
      candidate = f"{name}~{n}"
    if candidate != name:
      logging.warning("inpaint: %s is named %s (its name is taken by another input)", file,
                      candidate)
    seen.add(candidate)
    unique.append((candidate, file))
  return unique


def load_image(path: str, small_images: str = "upscale") -> np.ndarray | None:
  """uint8 [64, 64, 3] by the data pipeline's policy, or None (with a warning naming the file)."""
  try:
    image = image_files.decode_file(path)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = a bad file)
    logging.warning("inpaint: skipping %s: cannot decode (%s: %s)", path, type(e).__name__, e)
    return None
  if min(image.size) < SIZE and small_images == "skip":
    logging.warning("inpaint: skipping %s: smaller than %d px (data.small_images='skip')", path,
                    SIZE)
    return None
  return image_files.centre_crop_resize(image, SIZE)


def load_inputs(input_path: str, small_images: str = "upscale"
                ) -> tuple[list[tuple[str, str]], np.ndarray]:
  """The readable images of `list_inputs(input_path)`: ([(name, path)], uint8 [n, 64, 64, 3]).

  Raises:
    MissingPathError: `input_path` does not exist, or holds no image that can be read.
  """
  entries, pixels = [], []
  for name, path in list_inputs(input_path):
    image = load_image(path, small_images)
    if image is not None:
      entries.append((name, path))
      pixels.append(image)
  if not pixels:
    raise MissingPathError(f"--input: no readable image in {input_path} (see the warnings)")
  return entries, np.stack(pixels)


def _box_mask(spec: str) -> np.ndarray:
  try:
    x, y, w, h = (int(v) for v in spec.split(":", 1)[1].split(","))
  except ValueError:
    raise ConfigError(f"--mask: {spec!r} is not box:X,Y,W,H (integers)") from None
  if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > SIZE or y + h > SIZE:
    raise ConfigError(f"--mask: box {spec!r} must lie inside the {SIZE}x{SIZE} image")
  mask = np.ones((SIZE, SIZE, 1), np.float32)
  mask[y:y + h, x:x + w] = 0.0
  return mask


def mask_from_file(path: str) -> np.ndarray:
  """float32 [64, 64, 1] from a mask image: cropped/resized like inputs; black = missing."""
  grey = image_files.decode_file(path).convert("L")
  square = grey.crop(image_files.centre_square_box(grey.width, grey.height))
  if square.size != (SIZE, SIZE):
    square = square.resize((SIZE, SIZE), image_files.RESAMPLE)
  return (np.asarray(square, np.float32) >= 128).astype(np.float32)[..., None]


def check_mask(spec: str | None) -> np.ndarray | None:
  """A --mask value checked: None for the evaluation masks, else its one [64, 64, 1] mask.

  Raises:
    ConfigError: not an evaluation mask, a box inside the image or a readable mask image.
  """
  spec = spec or "centre"
  if spec in masks_lib.MASKS:
    return None
  if spec.startswith("box:"):
    return _box_mask(spec)
  if not os.path.isfile(spec):
    raise ConfigError(f"--mask: {spec!r} is not one of {', '.join(masks_lib.MASKS)}, "
                      "box:X,Y,W,H or an existing mask image")
  try:
    return mask_from_file(spec)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = a bad file)
    raise ConfigError(f"--mask: cannot read the mask image {spec} ({type(e).__name__}: "
                      f"{e})") from None


def make_masks(spec: str | None, count: int, seed: int) -> np.ndarray:
  """[count, 64, 64, 1] masks for the inputs from a --mask value (see the module docstring).

  Raises:
    ConfigError: a bad --mask value (`check_mask`).
  """
  spec = spec or "centre"
  mask = check_mask(spec)
  if mask is None:
    return np.stack([masks_lib.eval_mask(spec, seed, i, SIZE) for i in range(count)])
  missing = 1.0 - mask.mean()
  if missing == 0.0:
    logging.warning("inpaint: the mask %s has no missing (black) pixel: nothing to fill", spec)
  elif missing == 1.0:
    logging.warning("inpaint: the mask %s leaves no context: fill-ins are unconditional", spec)
  return np.repeat(mask[None], count, axis=0)


FILLS = evaluate.MODEL_FILLS  # --fill values (and "all")
PER_IMAGE_PRINT_LIMIT = 32  # per-image table printed for at most this many images (else file)


def parse_fill(text: str | Sequence[str] | None) -> tuple[str, ...]:
  """--fill: "all" (default), or a comma-separated subset of samples, mode, mean."""
  if text is None:
    return FILLS
  items = text.split(",") if isinstance(text, str) else list(text)
  items = [t.strip() for t in items if t.strip()]
  if items == ["all"]:
    return FILLS
  bad = [t for t in items if t not in FILLS]
  if bad or not items:
    raise ConfigError(f"--fill: {text!r} is not 'all' or a list of {', '.join(FILLS)}")
  return tuple(f for f in FILLS if f in items)


def is_complete(mask: str | None) -> bool:
  """True when --mask leaves the inputs complete (so the hole can be scored): not a mask image."""
  spec = mask or "centre"
  return spec in masks_lib.MASKS or spec.startswith("box:")


def padded_batches(n: int, size: int):
  """(index array of length `size`, number of real rows) covering 0..n-1; pads by repeating."""
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    yield np.minimum(idx, n - 1), min(size, n - start)


def _per_image_table(records: list[dict], methods: list[str]) -> str:
  """Markdown: one row per image, PSNR (dB) / SSIM of each method."""
  lines = ["| image | " + " | ".join(methods) + " |",
           "|---|" + "---:|" * len(methods)]
  for r in records:
    f = r["figures"]
    lines.append(f"| {r['name']} | " + " | ".join(
        f"{f[m]['psnr']:.2f} / {f[m]['ssim']:.3f}" for m in methods) + " |")
  return "\n".join(["PSNR (dB) / SSIM per image:", ""] + lines) + "\n"


def run(workdir: str, input_path: str, output: str, config=None, *, mask: str | None = None,
        num_samples: int = 4, temperature: float | Sequence[float] | str | None = None,
        rank: bool = False, checkpoint: str | int = "best", ema: bool = True,
        fill: str | Sequence[str] | None = "all",
        baseline_names: str | Sequence[str] = baselines.DEFAULT, pixels: str | None = None) -> dict:
  """Fills in the holes of the images at `input_path` and writes PNGs to `output`.

  Args:
    workdir: the trained run.
    input_path: an image file or a folder of images.
    output: output folder (created).
    config: the experiment config (default WORKDIR/config.json).
    mask: centre | boxes | freeform | box:X,Y,W,H | a mask image path (black = missing).
    num_samples: N fill-ins per image (and latent draws of the mean fill-in).
    temperature: tau, global or per level (or a string for `parse_temperature`); None =
      eval.temperature, else `sampling.DEFAULT_TEMPERATURE`.
    rank: order the fill-ins by the model's likelihood bound, most likely first.
    checkpoint: "best", "latest" or a step.
    ema: use the EMA parameters.
    fill: "all" or a subset of samples, mode, mean (see `parse_fill`).
    baseline_names: classical fill-ins, "biharmonic,ring_mean" (default), "none" or a sequence.
    pixels: pixels of the samples, "sample" | "mean" (None: eval.pixels, else the default).

  Returns:
    The results dict written to OUTPUT/results.json (with the temperature and pixels used).

  Raises:
    ConfigError: a bad --mask, --fill or --baselines value.
    MissingPathError: `input_path` does not exist or holds no readable image.
  """
  t0 = time.perf_counter()
  fills_wanted = parse_fill(fill)
  rank = rank and "samples" in fills_wanted  # only samples are ranked
  names = baselines.parse(baseline_names)
  reference = names[0] if names else None
  check_mask(mask)  # a bad --mask fails before the model is loaded
  model = api.load(workdir, checkpoint, ema, config=config)
  temperature = evaluate.resolve_temperature(temperature, model.config)
  model.temperatures(temperature)  # a per-level tuple of the wrong length fails here
  # "sample" | "mean"; `pixels` holds the input images below
  pixel_mode = sampling.check_pixels(pixels) if pixels else sampling.default_pixels(model.config)
  entries, pixels = load_inputs(input_path, model.config.data.get("small_images", "upscale"))
  masks = make_masks(mask, len(pixels), int(model.config.seed))
  scored = is_complete(mask)
  rng = jax.random.PRNGKey(int(model.config.seed))
  outputs: dict[str, np.ndarray] = {}
  per_method: dict[str, dict[str, list]] = {}
  batch = min(MAX_BATCH, len(pixels))
  for i, (idx, real) in enumerate(padded_batches(len(pixels), batch)):
    out = evaluate.model_fills(model, pixels[idx], masks[idx], num_samples=num_samples,
                               temperature=temperature, rng=jax.random.fold_in(rng, i),
                               rank_samples=RANK_SAMPLES if rank else None,
                               fills=fills_wanted, baseline_names=names, pixels=pixel_mode)
    for key, value in out.items():
      axis = 1 if key in ("samples", "scores") else 0
      value = np.take(value, np.arange(real), axis=axis)
      if key not in outputs:
        outputs[key] = np.zeros(value.shape[:axis] + (len(pixels),) + value.shape[axis + 1:],
                                value.dtype)
      if axis:
        outputs[key][:, idx[:real]] = value
      else:
        outputs[key][idx[:real]] = value
    if scored:
      figs, _ = evaluate.method_figures(out, pixels[idx], masks[idx])
      for method, values in figs.items():
        for fig, v in values.items():
          per_method.setdefault(method, {}).setdefault(fig, []).append(v[:real])
  if rank:
    order = np.argsort(-outputs["scores"], axis=0, kind="stable")
    outputs["samples"] = np.take_along_axis(outputs["samples"], order[..., None, None, None],
                                            axis=0)
    outputs["scores"] = np.take_along_axis(outputs["scores"], order, axis=0)
  per_method = {m: {f: np.concatenate(v) for f, v in figs.items()}
                for m, figs in per_method.items()}

  os.makedirs(output, exist_ok=True)
  context = grids.hole_overlay(pixels, masks)
  num_dims = missing_dims(masks)
  singles = [k for k in ("mode", "mean", *names) if k in outputs]
  records = []
  for b, (name, path) in enumerate(entries):
    files = {"input": f"{name}_input.png", "context": f"{name}_context.png"}
    if "samples" in outputs:
      files["fills"] = [f"{name}_fill_{i + 1}.png" for i in range(num_samples)]
    files.update({k: f"{name}_{k}.png" for k in singles})
    grids.save_png(os.path.join(output, files["input"]), pixels[b])
    grids.save_png(os.path.join(output, files["context"]), context[b])
    for i, file in enumerate(files.get("fills", [])):
      grids.save_png(os.path.join(output, file), outputs["samples"][i, b])
    for k in singles:
      grids.save_png(os.path.join(output, files[k]), outputs[k][b])
    record = {"name": name, "source": os.path.abspath(path), "files": files,
              "missing_pixels": int(num_dims[b] // 3)}
    if rank:
      record["bpd"] = bits_per_dim(-outputs["scores"][:, b], num_dims[b]).tolist()
    if scored:
      record["figures"] = {m: {f: float(v[b]) for f, v in figs.items()}
                           for m, figs in per_method.items()}
    records.append(record)
  grid = evaluate.fill_grid(outputs, pixels, masks, len(entries), reference, truth_label="input")
  grids.save_png(os.path.join(output, "grid.png"), grid)
  results = {"workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
             "checkpoint_step": model.step, "ema": ema, "mask": mask or "centre",
             "num_samples": num_samples, "temperature": temperature, "pixels": pixel_mode,
             "ranked": rank,
             "rank_samples": RANK_SAMPLES if rank else None, "fill": list(fills_wanted),
             "baselines": list(names), "scored": scored, "images": records}
  if scored:
    table = evaluate.methods_summary(per_method, reference)
    results["reference"] = reference
    results["methods"] = table
    text = evaluate.format_table(
        table, reference, len(entries),
        f"Fill-in methods: {workdir} step {model.step}, {input_path}, mask {mask or 'centre'}, "
        f"N={num_samples}, tau {temperature}, pixels {pixel_mode}")
    per_image = _per_image_table(records, list(table))
    with open(os.path.join(output, "table.md"), "w") as f:
      f.write(text + "\n" + per_image)
    print(text, flush=True)
    if len(records) <= PER_IMAGE_PRINT_LIMIT:
      print(per_image, flush=True)
    else:
      print(f"(per-image figures: {os.path.join(output, 'table.md')})", flush=True)
  results["wall_time_s"] = time.perf_counter() - t0
  atomic.write_json(os.path.join(output, "results.json"), results, strict=True)
  logging.info("inpaint: %d image(s), %d fill-in(s) each, written to %s (%.1fs)", len(entries),
               num_samples, output, time.perf_counter() - t0)
  return results
