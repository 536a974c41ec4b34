"""PNG grids for WORKDIR/images/ and the report: grids with column headers, hole overlays, heatmaps.

Everything here is host-side numpy on uint8 [H, W, 3] images (floats in 0..255 are accepted and
rounded), so it can run on any process without touching the accelerator.
"""

from __future__ import annotations

import os
import tempfile

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = 255
HOLE_GREY = 128


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 from uint8 or from floats in 0..255 (rounded, clipped)."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """[..., H, W, 1 or 3] -> [..., H, W, 3]; grey images are repeated over the channels."""
  if images.shape[-1] == 1:
    return np.repeat(images, 3, axis=-1)
  if images.shape[-1] != 3:
    raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
  return images


def _header(labels: list[str], width: int, cell_w: int, pad: int, scale: int) -> np.ndarray:
  """A white strip [h, width, 3] with each label centred over its column."""
  font = ImageFont.load_default(size=10 * scale)
  boxes = [font.getbbox(label) for label in labels]
  text_h = max((b[3] for b in boxes), default=0)
  strip = Image.new("RGB", (width, text_h + 2 * pad), (WHITE,) * 3)
  draw = ImageDraw.Draw(strip)
  for col, (label, box) in enumerate(zip(labels, boxes)):
    x0 = pad + col * (cell_w + pad)
    # Centre the text on the column; a label wider than its column starts at the column's edge.
    x = x0 + max(0, (cell_w - (box[2] - box[0])) // 2) - box[0]
    draw.text((x, pad), label, fill=(0, 0, 0), font=font)
  return np.asarray(strip, np.uint8)


def _row_header(labels: list[str], height: int, cell_h: int, pad: int, scale: int) -> np.ndarray:
  """A white strip [height, w, 3] with each label centred vertically on its row."""
  font = ImageFont.load_default(size=10 * scale)
  boxes = [font.getbbox(label) for label in labels]
  text_w = max((b[2] for b in boxes), default=0)
  strip = Image.new("RGB", (text_w + 2 * pad, height), (WHITE,) * 3)
  draw = ImageDraw.Draw(strip)
  for row, (label, box) in enumerate(zip(labels, boxes)):
    y0 = pad + row * (cell_h + pad)
    draw.text((pad, y0 + max(0, (cell_h - (box[3] - box[1])) // 2) - box[1]), label,
              fill=(0, 0, 0), font=font)
  return np.asarray(strip, np.uint8)


def make_grid(rows: list[np.ndarray], *, labels: list[str] | None = None, pad: int = 2,
              scale: int = 1, row_labels: list[str] | None = None) -> np.ndarray:
  """Tiles rows of images into one image, with optional column headers and row labels.

  Args:
    rows: one [N, H, W, 3] (or [N, H, W, 1]) array per grid row, uint8 or floats in 0..255; all
      the same H and W. Rows with fewer than the most images are padded with white cells.
    labels: optional header text per column (e.g. ["context", "truth", "sample 1", "mean"]),
      drawn with PIL's default font above the grid.
    pad: white pixels between cells and around the grid.
    scale: integer nearest-neighbour upscaling of every cell (the padding is not scaled).
    row_labels: optional text per row (e.g. ["level 1", "level 2"]), drawn left of the grid.

  Returns:
    uint8 [H', W', 3]: the grid, rows stacked vertically, images of a row side by side.
  """
  if not rows:
    raise ValueError("make_grid needs at least one row")
  if scale < 1 or pad < 0:
    raise ValueError(f"need scale >= 1 and pad >= 0; got scale={scale}, pad={pad}")
  rows = [_to_rgb(_to_uint8(row)) for row in rows]
  shapes = {row.shape[1:3] for row in rows}
  if any(row.ndim != 4 for row in rows) or len(shapes) != 1:
    raise ValueError(f"rows must be [N, H, W, C] with one H, W; got {[r.shape for r in rows]}")
  (h, w), = shapes
  cell_h, cell_w = h * scale, w * scale
  num_cols = max(row.shape[0] for row in rows)
  if labels is not None and len(labels) != num_cols:
    raise ValueError(f"{len(labels)} labels for {num_cols} columns")
  if row_labels is not None and len(row_labels) != len(rows):
    raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
  height = len(rows) * (cell_h + pad) + pad
  width = num_cols * (cell_w + pad) + pad
  grid = np.full((height, width, 3), WHITE, np.uint8)
  for r, row in enumerate(rows):
    row = row.repeat(scale, axis=1).repeat(scale, axis=2)
    y = pad + r * (cell_h + pad)
    for c, image in enumerate(row):
      x = pad + c * (cell_w + pad)
      grid[y:y + cell_h, x:x + cell_w] = image
  if row_labels:
    grid = np.concatenate([_row_header(row_labels, height, cell_h, pad, scale), grid], axis=1)
  if labels:
    header = _header(labels, width, cell_w, pad, scale)
    left = np.full((header.shape[0], grid.shape[1] - width, 3), WHITE, np.uint8)
    grid = np.concatenate([np.concatenate([left, header], axis=1), grid], axis=0)
  return grid


def hole_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The "context" view: the given pixels of `image`, the missing ones grey.

  Args:
    image: [..., H, W, 3] uint8 or floats in 0..255.
    mask: [..., H, W, 1] or [..., H, W], 1 = given, 0 = missing (values > 0.5 count as given).

  Returns:
    uint8 [..., H, W, 3]: `image` with every missing pixel set to 128 in all channels.
  """
  image = _to_uint8(image)
  mask = np.asarray(mask)
  # A channel-less mask [..., H, W] ends in W; give it the channel axis so it broadcasts.
  if mask.shape[-1] != 1:
    mask = mask[..., None]
  return np.where(mask > 0.5, image, np.uint8(HOLE_GREY)).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes `image` as a PNG, creating parent directories; atomic (readers never see half a file).

  Args:
    path: destination file.
    image: uint8 (or 0..255 floats) [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
  """
  image = _to_uint8(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # The temporary file sits in the target directory so that the rename stays on one filesystem.
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def heatmap(values: np.ndarray, size: int = 64, vmax: float | None = None) -> np.ndarray:
  """Colours a 2-D map (e.g. KL per latent position) with viridis, upscaled to size x size.

  Args:
    values: [h, w] floats; 0 maps to the darkest colour, `vmax` and above to the brightest.
      Negative values clip to 0; NaN/inf are drawn black.
    size: output height and width (nearest-neighbour resampling).
    vmax: the value of the brightest colour; defaults to the finite maximum of `values`. Pass a
      shared vmax to make several heatmaps comparable.

  Returns:
    uint8 [size, size, 3].
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 2:
    raise ValueError(f"heatmap takes a [h, w] array, got shape {values.shape}")
  finite = np.isfinite(values)
  if vmax is None:
    vmax = float(values[finite].max()) if finite.any() else 0.0
  # An all-zero map (vmax 0) is drawn in the darkest colour rather than dividing by zero.
  normed = np.clip(values / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(values)
  rgba = matplotlib.colormaps["viridis"](normed, bytes=True)  # [h, w, 4] uint8
  rgb = np.where(finite[..., None], rgba[..., :3], np.uint8(0)).astype(np.uint8)
  h, w = values.shape
  rows = np.arange(size) * h // size
  cols = np.arange(size) * w // size
  return rgb[rows][:, cols]
