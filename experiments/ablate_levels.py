"""Ablation: number of levels L = 1…6, both posterior types, and the deterministic baseline.

Every point has the same data (the embedded photographs), the same model size (the quickstart's:
width 32, one residual block per resolution, 4-channel 2-D latents, a 32-d top vector) and the
same budget (steps × batch); only the swept keys differ. Seeds are an ordinary axis.

  python launch.py --config=experiments/ablate_levels.py --sweep --workdir=runs/ablate_levels
  python launch.py --config=experiments/ablate_levels.py:cpu --sweep \
      --workdir=runs/ablate_levels_cpu                                  # 2-core CPU, ~30 min
  python launch.py --config=experiments/ablate_levels.py:cpu --sweep --dry_run   # list points
  python launch.py --mode=report --workdir=runs/ablate_levels_cpu       # the comparison table

Full grid (for an accelerator): L ∈ {1,…,6} × posterior ∈ {bottom_up, top_down} (12 points) plus
the deterministic encoder–decoder at L = 3 (the quickstart's resolutions), × seeds {0, 1, 2}:
39 runs of 2000 steps at batch 16, evaluated every 250 steps, IW bound with K = 64.

`:cpu` (one 2-core CPU, about 30 minutes in all at the quickstart's ~1.8 steps/s): L ∈ {1, 3}
with the bottom_up posterior and the deterministic baseline at L = 3 (3 points) × seeds {0, 1}:
6 runs of 500 steps (≈ 4.7 min of training each, plus compilation, 4 evaluations and the
closing IW evaluation with K = 16). 500 steps because that is where the quickstart's HVAE first
pulls ahead of the deterministic baseline (at 250 steps the baseline is still ahead: 6.455 vs
6.495 bits/dim), so a shorter budget would only compare warm-ups. Trimmed from the full grid so
that both `:cpu` sweeps fit in ~90 minutes together: L = 2, 4, 5 and 6, the top_down posterior,
the third seed, the budget (500 steps, not 2000), the swap-diagnostic examples (32) and the IW
samples (16, not 64). Read the :cpu table as early fit at equal compute, not as what the models
converge to.
"""

from experiments import quickstart

FULL_LEVELS = (1, 2, 3, 4, 5, 6)
CPU_LEVELS = (1, 3)
BASELINE_LEVELS = 3  # the deterministic model uses the quickstart's L


def _check(arg: str | None) -> None:
  if arg not in (None, "", "cpu"):
    raise ValueError(f"experiments/ablate_levels.py: unknown argument {arg!r} (use 'cpu')")


def get_config(arg: str | None = None):
  _check(arg)
  c = quickstart.get_config()
  c.model.num_levels = BASELINE_LEVELS
  # The model these sweeps measured (docs/results.md), before the faces recipe changed the
  # quickstart: bottom-up posterior, nearest upsampling, exact likelihood gradients.
  c.model.posterior, c.model.upsample, c.model.likelihood_grad = "bottom_up", "nearest", "exact"
  c.model.likelihood_grad_anneal = ()
  if arg == "cpu":
    c.train.num_steps = 500
    c.train.checkpoint_every_steps = 125
    c.eval.every_steps = 125
    c.eval.iw_samples = 16
    c.eval.num_swap_examples = 32
    c.eval.diagnostics_every = 2
  else:
    c.train.num_steps = 2000
    c.train.checkpoint_every_steps = 500
    c.eval.every_steps = 250
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """The points (docs/sweeps.md): dotted config key -> value, one dict per run."""
  _check(arg)
  cpu = arg == "cpu"
  seeds = (0, 1) if cpu else (0, 1, 2)
  points = []
  for seed in seeds:
    for levels in CPU_LEVELS if cpu else FULL_LEVELS:
      for posterior in ("bottom_up", "top_down"):
        if cpu and posterior == "top_down":
          continue
        points.append({"model.num_levels": levels, "model.posterior": posterior, "seed": seed})
    points.append({"model.kind": "deterministic", "model.num_levels": BASELINE_LEVELS,
                   "seed": seed})
  return points
