"""Ablation: number of levels L = 1…6, both posterior types, and the deterministic baseline.

Every point has the same data (the embedded photographs), the same model size (the quickstart's:
width 32, one residual block per resolution, 4-channel 2-D latents, a 32-d top vector) and the
same budget (steps × batch); only the swept keys differ. Seeds are an ordinary axis.

  python launch.py --config=experiments/ablate_levels.py --sweep --workdir=runs/ablate_levels
  python launch.py --config=experiments/ablate_levels.py:cpu --sweep \
      --workdir=runs/ablate_levels_cpu                                  # 2-core CPU, ~70 min
  python launch.py --config=experiments/ablate_levels.py:cpu --sweep --dry_run   # list points
  python launch.py --mode=report --workdir=runs/ablate_levels_cpu       # the comparison table

Full grid (for an accelerator): L ∈ {1,…,6} × posterior ∈ {bottom_up, top_down} (12 points) plus
the deterministic encoder–decoder at L = 3 (the quickstart's resolutions), × seeds {0, 1, 2}:
39 runs of 2000 steps at batch 16, evaluated every 250 steps, IW bound with K = 64.

`:cpu` (one 2-core CPU, about 70 minutes in all at the quickstart's ~1.8 steps/s): L ∈ {1,2,3,4}
with the bottom_up posterior, top_down at L = 3 only, and the deterministic baseline (6 points)
× seeds {0, 1}: 12 runs of 400 steps (≈ 3.7 min of training each, plus compilation, 4
evaluations and the closing IW evaluation with K = 16: ≈ 5.7 min a run; a 40-step run of the
L = 4 point measured ~100 s of compilation and IW evaluation per run). Trimmed from the full
grid: L = 5 and 6, top_down at L ≠ 3, the third seed, the budget (400 steps, not 2000), the
swap-diagnostic examples (32) and the IW samples (16, not 64). 400 steps rank the models by early
fit, not by what they converge to: read the :cpu table as a smoke test of the comparison.
"""

from experiments import quickstart

FULL_LEVELS = (1, 2, 3, 4, 5, 6)
CPU_LEVELS = (1, 2, 3, 4)
BASELINE_LEVELS = 3  # the deterministic model and the :cpu top_down point use the quickstart's L


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu"):
    raise ValueError(f"experiments/ablate_levels.py: unknown argument {arg!r} (use 'cpu')")
  c = quickstart.get_config()
  c.model.num_levels = BASELINE_LEVELS
  if arg == "cpu":
    c.train.num_steps = 400
    c.train.checkpoint_every_steps = 100
    c.eval.every_steps = 100
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
  cpu = arg == "cpu"
  seeds = (0, 1) if cpu else (0, 1, 2)
  points = []
  for seed in seeds:
    for levels in CPU_LEVELS if cpu else FULL_LEVELS:
      for posterior in ("bottom_up", "top_down"):
        if cpu and posterior == "top_down" and levels != BASELINE_LEVELS:
          continue
        points.append({"model.num_levels": levels, "model.posterior": posterior, "seed": seed})
    points.append({"model.kind": "deterministic", "model.num_levels": BASELINE_LEVELS,
                   "seed": seed})
  return points
