"""Quickstart: the README's main job, ~10 minutes on a 2-core CPU, on the embedded photographs.

  python launch.py --config=experiments/quickstart.py
  python launch.py --config=experiments/quickstart.py:deterministic   # the baseline, same budget

Three levels: z_1 32x32x4, z_2 16x16x4 and a 32-d top vector computed from 8x8 features. It
shares the choices of the faces recipe (experiments/faces_cpu.py, docs/results.md "Learning
structure"): top-down inference, bilinear upsampling, and scaled likelihood gradients
annealed to exact ones over steps 500-700. Its own (docs/results.md, "The hole's fill"):
`model.hole_fill = "multiscale"` and `model.fill_residual = True`: the prior input's hole holds
a smooth multiscale fill of the context and the likelihood predicts the residual from it. Eight
training photographs do not teach a model to continue an unseen scene; a smooth fill does, and
the model learns what to add to it (held-out bits/dim 6.155 -> 5.940; the mode fill-in from
0.7 dB below biharmonic inpainting to 0.4 dB above it). Not taken from the faces recipe: free
bits (docs/results.md, "Free bits on level 1 of the quickstart": at (512, 0, 0) with the prior
learning, bits/dim improve on both seeds but the mode fill-in falls below biharmonic on one).
"""

from experiments import base


def get_config(arg: str | None = None):
  c = base.get_config()
  c.data.source = "embedded"
  c.model.num_levels = 3
  c.model.width = 32
  c.model.blocks_per_level = 1
  c.model.latent_channels = (4,)
  c.model.top_latent_dim = 32
  c.model.num_mixtures = 5
  c.model.posterior = "top_down"
  c.model.upsample = "bilinear"
  c.model.hole_fill = "multiscale"
  c.model.fill_residual = True
  c.model.likelihood_grad = "scaled"
  c.model.likelihood_grad_anneal = (500, 700)
  c.model.likelihood_region = "centre"  # same loss, fewer FLOPs
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.995
  c.train.num_steps = 1000
  c.train.batch_size = 16
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 250
  c.eval.every_steps = 250
  c.eval.num_examples = 64
  c.eval.batch_size = 32
  c.eval.num_samples = 4
  c.eval.num_grid_examples = 8
  if arg == "deterministic":
    c.model.kind = "deterministic"
  elif arg:
    raise ValueError(f"experiments/quickstart.py: unknown argument {arg!r} (use 'deterministic')")
  return c
