"""Fill-in quality against the latent temperature tau, to choose `sampling.DEFAULT_TEMPERATURE`.

  python -m benchmarks.temperature_sweep --workdir=runs/celeba_l4 [--input=held_out_photos/]
      [--temperatures=0,0.5,0.7,0.85,1,0.85/0/0] [--mask=centre] [--num_samples=8]
      [--checkpoint=best] [--pixels=sample|sample:T|mean]

Runs the `--mode=eval` fill-in methods (mode, mean, sample, best_of_N, ranked, mean_of_samples,
the baselines; no likelihood bound, which does not depend on tau) at every tau, on the images
of --input (complete images) or on the run's validation split, and prints one markdown table:
PSNR / SSIM / L1 / hf_ratio per method and tau, the best tau of each method by PSNR marked *.
A tau written `0.85/0/0` is one per level, level 1 (the finest) first: which level's sampling
does what. Each tau's full results go to OUT/tau_TAU/ (results.json, table.md, grid.png; `/`
written `-`), the table to OUT/table.md; OUT is WORKDIR/eval/temperature_sweep[/INPUT_NAME]
unless --output is given. Read `mean` and `sample` together: PSNR favours smooth fill-ins (low
tau), hf_ratio near 1 favours detailed ones.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run.", required=True)
_INPUT = flags.DEFINE_string("input", None, "Complete images to score (default: validation).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default under WORKDIR/eval).")
_TEMPERATURES = flags.DEFINE_list(
    "temperatures", ["0", "0.5", "0.7", "0.85", "1"],
    "The taus: each for every level, or one per level joined by / (level 1 first: 0.85/0/0).")
_MASK = flags.DEFINE_string("mask", None, "Mask (default data.eval_mask).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "N (default eval.num_samples).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best | latest | STEP.")
_BASELINES = flags.DEFINE_string("baselines", "biharmonic,ring_mean", "Baselines, or none.")
_PIXELS = flags.DEFINE_string(
    "pixels", None, "Pixels of the samples: sample, sample:T or mean (default: eval.pixels).")


def main(argv):
  del argv
  from hvae.modes import evaluate

  _, text = evaluate.temperature_sweep(
      _WORKDIR.value, [evaluate.parse_tau(t) for t in _TEMPERATURES.value], input_path=_INPUT.value,
      output=_OUTPUT.value, checkpoint=_CHECKPOINT.value, mask=_MASK.value,
      num_samples=_NUM_SAMPLES.value, baseline_names=_BASELINES.value, pixels=_PIXELS.value)
  print(text)


if __name__ == "__main__":
  app.run(main)
