"""CelebA 64x64, four levels: the design card's main experiment, sized for an accelerator.

  python launch.py --config=experiments/celeba_l4.py --workdir=runs/celeba_l4 \
      --config.data.manual_dir=/path/to/celeba_files     # offline: see README "CelebA"

z_1 32x32x16, z_2 16x16x16, z_3 8x8x16 and a 256-d top vector from 4x4 features; width 128,
two residual blocks per resolution; global batch 128 split over all devices; 7.7M parameters.
Expected cost (BENCHMARKS.md, `python -m benchmarks.train_step --config=experiments/celeba_l4.py`):
~7.4e12 FLOPs per step at batch 128, i.e. ~65 s/step on a 2-core CPU (not a CPU job); an
estimated ~0.4 s/step, ~1 GPU-day for 200k steps on one H100 (not measured yet), proportionally
less on a TPU slice.
"""

from experiments import base


def get_config(arg: str | None = None):
  c = base.get_config()
  c.data.source = "celeb_a"
  c.data.celeb_a_crop = 140
  c.model.num_levels = 4
  c.model.width = 128
  c.model.blocks_per_level = 2
  c.model.latent_channels = (16,)
  c.model.top_latent_dim = 256
  c.model.num_mixtures = 10
  # From the faces recipe (docs/results.md "Learning structure"). Its scaled likelihood
  # gradients were measured on grey photos only, where G and B given R are near-exact; colour
  # CelebA keeps exact gradients until measured (--config.model.likelihood_grad=scaled).
  c.model.posterior = "top_down"
  c.model.upsample = "bilinear"
  c.model.likelihood_region = "centre"  # same loss, fewer FLOPs
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 2000
  c.optim.skip_threshold = 2000.0
  c.optim.ema_decay = 0.9998
  c.loss.kl_warmup_steps = 10_000
  c.train.num_steps = 200_000
  c.train.batch_size = 128
  c.train.log_every_steps = 200
  c.train.checkpoint_every_steps = 5000
  c.eval.every_steps = 5000
  c.eval.num_examples = 2048
  c.eval.batch_size = 256
  del arg
  return c
