"""Decoding any image file to RGB uint8, and the crops and resizes every source shares.

All resizing goes through Pillow's antialiased BICUBIC filter (Pillow widens the filter support
when downscaling), so a 1000 px photo and a 140 px face crop are both reduced without aliasing.

Colour handling, for files of any mode:
* EXIF orientation is applied first (a portrait photo taken sideways comes out upright);
* 16-bit greyscale (`I;16*`, `I`) is scaled to 8 bits (value / 257), not clipped;
* transparency (RGBA, LA, palette with a transparent index) is composited on WHITE, so a
  transparent background reads as white paper rather than as whatever colour the invisible
  pixels happen to store;
* everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) through Pillow's `convert("RGB")`.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downscaling
_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
  """Returns `image` upright and in mode RGB, 8 bits per channel.

  Args:
    image: a Pillow image of any mode (its first frame is used for animations).

  Returns:
    An RGB Pillow image with EXIF orientation applied and transparency composited on white.
  """
  image = ImageOps.exif_transpose(image)
  mode = image.mode
  if mode.startswith("I;16") or mode in ("I", "F"):
    values = np.asarray(image, dtype=np.float64)
    # 16-bit files use the full 0..65535 range; a float image in [0, 1] is scaled up.
    scale = 1 / 257 if mode != "F" or values.max() > 1.0 else 255.0
    grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
  if mode == "P" and "transparency" in image.info:
    image, mode = image.convert("RGBA"), "RGBA"
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode != "RGB":
    return image.convert("RGB")
  return image


def decode_file(path: str | os.PathLike[str]) -> Image.Image:
  """Decodes an image file by its content (not its extension) to an upright RGB image.

  Args:
    path: the file.

  Returns:
    An RGB Pillow image.

  Raises:
    OSError, ValueError, Image.DecompressionBombError (etc.): the file is not a decodable image;
    a truncated file raises instead of being padded with grey.
  """
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # decode now, so truncation errors surface here and not later
    return to_rgb(image)


def centre_square_box(
  width: int, height: int, crop: int | None = None
) -> tuple[int, int, int, int]:
  """Returns the (left, top, right, bottom) box of a centred square.

  Args:
    width: image width.
    height: image height.
    crop: side of the square; None = the largest square that fits.

  Returns:
    The box, in pixels.
  """
  side = min(width, height) if crop is None else min(crop, width, height)
  left = (width - side) // 2
  top = (height - side) // 2
  return left, top, left + side, top + side


def resize_box(image: Image.Image, box, size: int) -> np.ndarray:
  """Crops `box` out of `image` and resizes it to `size`×`size` in one resampling pass.

  Args:
    image: an RGB Pillow image.
    box: (left, top, right, bottom), floats allowed (sub-pixel crops for random crops).
    size: output side.

  Returns:
    uint8 [size, size, 3].
  """
  # reducing_gap first shrinks by an integer factor (box filter), which keeps big photos fast
  # while staying antialiased.
  out = image.resize((size, size), RESAMPLE, box=tuple(float(b) for b in box), reducing_gap=3.0)
  return np.asarray(out, dtype=np.uint8)


def centre_crop_resize(
  image: Image.Image | np.ndarray, size: int, crop: int | None = None
) -> np.ndarray:
  """Centre square crop (the largest square, or `crop` px) then antialiased resize.

  Args:
    image: an RGB Pillow image or a uint8 [H, W, 3] array.
    size: output side.
    crop: side of the centre square before resizing; None = the largest that fits.

  Returns:
    uint8 [size, size, 3].
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  # Crop first: resizing with `box=` would let the filter reach pixels outside the square.
  square = image.crop(centre_square_box(image.width, image.height, crop))
  if square.size != (size, size):
    square = square.resize((size, size), RESAMPLE, reducing_gap=3.0)
  return np.asarray(square, dtype=np.uint8)


def random_resized_box(
  width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[float, ...]:
  """Draws a random crop box (Inception-style: random area fraction and aspect, random place).

  Args:
    width: image width.
    height: image height.
    rng: the generator all draws come from.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's width / height (drawn log-uniformly).

  Returns:
    (left, top, right, bottom) in pixels, inside the image.
  """
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = np.sqrt(target * aspect)
    h = np.sqrt(target / aspect)
    if w <= width and h <= height:
      left = rng.uniform(0, width - w)
      top = rng.uniform(0, height - h)
      return left, top, left + w, top + h
  # Fallback for extreme aspect draws: the largest centred square, as a deterministic default.
  return centre_square_box(width, height)
