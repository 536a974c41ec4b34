"""Small factories shared by tests (tiny model configs, fake batches)."""

import numpy as np

from hvae.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
  """A model small enough to compile in seconds on a CPU; per-level fields sized to L."""
  num_levels = overrides.pop("num_levels", 3)
  kw = dict(num_levels=num_levels, width=8, blocks_per_level=1, top_latent_dim=4,
            latent_channels=(2,) * num_levels, num_mixtures=2,
            dropout=(0.0,) * num_levels, sigma_floor=(0.0,) * num_levels)
  kw.update(overrides)
  return ModelConfig(**kw)


def centre_mask(batch: int) -> np.ndarray:
  """[B, 64, 64, 1] float32, 0 in the central 32x32 square."""
  m = np.ones((batch, 64, 64, 1), np.float32)
  m[:, 16:48, 16:48] = 0.0
  return m


def random_images(batch: int, seed: int = 0) -> np.ndarray:
  """[B, 64, 64, 3] smooth-ish random uint8 images."""
  rs = np.random.RandomState(seed)
  coarse = rs.randint(0, 256, (batch, 8, 8, 3)).astype(np.float32)
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  img += rs.normal(0, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def load_experiment(name: str, arg: str | None = None):
  """Loads experiments/NAME.py's get_config(arg) without making `experiments` a package."""
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
