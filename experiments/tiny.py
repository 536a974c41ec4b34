"""Tiny experiment for tests: synthetic images, a 2-level model a few thousand parameters big.

  python launch.py --config=experiments/tiny.py --workdir=/tmp/tiny
  python launch.py --config=experiments/tiny.py --sweep --workdir=/tmp/tiny_sweep  # two seeds
"""

from experiments import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.data.source = "synthetic"
  c.model.num_levels = 2
  c.model.width = 8
  c.model.blocks_per_level = 1
  c.model.latent_channels = (2,)
  c.model.top_latent_dim = 4
  c.model.num_mixtures = 2
  c.optim.warmup_steps = 2
  c.optim.ema_decay = 0.9
  c.train.num_steps = 6
  c.train.batch_size = 8
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 3
  c.eval.every_steps = 3
  c.eval.num_examples = 8
  c.eval.batch_size = 8
  c.eval.num_samples = 2
  c.eval.num_grid_examples = 2
  c.eval.iw_samples = 4
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """Two seeds of the same config: the smallest sweep, for tests (docs/sweeps.md)."""
  del arg
  return [{"seed": s} for s in (0, 1)]
