"""Cost of the evaluation passes per held-out example, in units of one forward pass and in seconds.

  python -m benchmarks.eval_cost --config=experiments/quickstart.py
  python -m benchmarks.eval_cost --config=experiments/celeba_l4.py --batch_size=8 --iw_samples=64
  python -m benchmarks.eval_cost --config=experiments/quickstart.py --evaluator

One forward pass: the model at the evaluation batch, every level from the posterior, reduced to
one log importance weight per example (`hvae.iw` with K = 1, the trunk not shared): what the
training pass computes without its gradient. Measured at the same batch B, in the same process:

* the importance-weighted bound with K = `eval.iw_samples` (`hvae.iw.log_weights`, the trunk
  run once per batch and its features reused by the K samples), and the same bound with K full
  forward passes (`share_trunk=False`, the implementation before): seconds per example, forward
  passes per example and per sample (the issue's target: <= 1.5 K forward passes), and the
  same ratios in XLA's FLOP counts (independent of how busy the machine is);
* the posterior->prior swap pass of the training-time diagnostics (hvae/diagnostics.py): L + 1
  forward passes per example as written, fewer in fact (XLA computes their common parts once:
  the trunk sees the same inputs in every pass);
* an estimate of one training-time evaluation (`hvae.evaluation.Evaluator`) in forward passes
  from `config.eval` (`evaluation_forwards`, which `benchmarks/train_step.py` also uses for its
  ETA), and with `--evaluator` the measured time of one such evaluation (warm) on synthetic
  images of the config's sizes.

Random initial parameters: costs do not depend on the parameter values. Timings are medians of
`--repeats` calls after one call that compiles.
"""

from __future__ import annotations

import copy
import math
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hvae import data, diagnostics, eta, evaluation, iw
from hvae.mesh import make_mesh, prepare, replicate
from hvae.model import ladder
from hvae.model.ladder import HVAE
from hvae.typed_config import ModelConfig


def _define_flags() -> dict:
  """The command line (defined when run as a script only: tests and train_step import this)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment file.",
                                                lock_config=True),
      "batch_size": flags.DEFINE_integer("batch_size", 0,
                                         "Evaluation batch B (0 = eval.batch_size)."),
      "iw_samples": flags.DEFINE_integer("iw_samples", 0,
                                         "K of the IW bound (0 = eval.iw_samples)."),
      "repeats": flags.DEFINE_integer("repeats", 3, "Timed calls of each pass (median)."),
      "previous": flags.DEFINE_bool("previous", True, "Also time the IW bound with K full "
                                    "forward passes (the implementation before the trunk was "
                                    "shared)."),
      "evaluator": flags.DEFINE_bool("evaluator", False, "Also time one training-time "
                                     "evaluation (config.eval's sizes, synthetic images)."),
  }


def evaluation_forwards(config) -> dict[str, float]:
  """Forward passes of one training-time evaluation (`hvae.evaluation.Evaluator`), from config.

  An estimate: every pass counts as one forward pass at its batch, also the prior-only passes
  of the fill-ins (which skip the posterior's trunk pass, so they cost less). Refinement
  (`eval.refine_steps` > 0) counts 3 forward passes (forward and backward) per step and example.

  Returns:
    {"passes": the ELBO passes over `eval/` and `eval_train/`, "swap": the posterior->prior
     swap, "grid": the fill-in grid's samples and mode, "diagnostics": the diagnostic images
     (averaged over `eval.diagnostics_every`), "refine": the encoder/decoder split,
     "total"}; forward passes per evaluation.
  """
  e = config.eval
  model_cfg = ModelConfig.from_config(config)
  L = model_cfg.num_levels
  bs = int(e.batch_size)
  rows = math.ceil(int(e.num_examples) / bs) * bs  # eval_batches pads the last batch
  out = {"passes": 2.0 * rows, "swap": 0.0, "diagnostics": 0.0, "refine": 0.0,
         "grid": float(e.num_grid_examples) * (int(e.num_samples) + 1)}
  if model_cfg.has_latents:
    swap_rows = min(math.ceil(int(e.num_swap_examples) / bs) * bs, rows)  # whole batches
    out["swap"] = 2.0 * swap_rows * (L + 1)
    per_diagnostics = int(e.num_worst) * L + 2 * L * max(int(e.num_samples), 4)
    out["diagnostics"] = per_diagnostics / max(int(e.diagnostics_every), 1)
    if int(e.get("refine_steps", 0)) > 0:
      out["refine"] = 2.0 * int(e.refine_examples) * int(e.refine_steps) * 3
  out["total"] = sum(out.values())
  return out


def _batch(batch_size: int, seed: int = 0) -> dict:
  """Random pixels, centre mask (the costs do not depend on the values)."""
  rs = np.random.RandomState(seed)
  mask = np.ones((batch_size, 64, 64, 1), np.float32)
  mask[:, 16:48, 16:48] = 0
  return {"image": rs.randint(0, 256, (batch_size, 64, 64, 3)).astype(np.uint8), "mask": mask,
          "weight": np.ones(batch_size, np.float32)}


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of `repeats` further calls), seconds; fn blocks."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def _flops(jitted, *args) -> float:
  """XLA's cost-analysis FLOPs of one call, as lowered (nan where the backend has none)."""
  return eta.xla_flops(jitted.lower(*args)) or float("nan")


def forward_fn(model: HVAE):
  """Jitted (params, image, mask, rng) -> [1, B]: one forward pass, the unit of these costs."""
  return iw.make_log_weights_fn(model, 1, share_trunk=False)


def measure(config, *, batch_size: int = 0, iw_samples: int = 0, repeats: int = 3,
            previous: bool = True, evaluator: bool = False) -> dict:
  """The costs of the module docstring for `config` on this machine.

  Args:
    config: the experiment config.
    batch_size: B (0 = eval.batch_size).
    iw_samples: K (0 = eval.iw_samples).
    repeats: timed calls per pass (median).
    previous: also the IW bound with K full forward passes.
    evaluator: also one training-time evaluation (`hvae.evaluation.Evaluator`), timed warm.

  Returns:
    A flat dict: batch_size, iw_samples, iw_chunk, num_levels; forward_s (one pass at B);
    for each of "iw", "iw_previous" (with `previous`) and "swap": {name}_compile_s (first
    call), {name}_s (per batch), {name}_s_per_example, {name}_forwards (per example, in
    forward passes) and {name}_flop_forwards (the same from XLA's FLOP counts); iw_per_k and
    iw_previous_per_k (forward passes per sample); eval_forwards (`evaluation_forwards`'s
    total) and eval_estimate_s; with `evaluator`, evaluator_s (warm) and evaluator_forwards.
  """
  e = config.eval
  B = int(batch_size or e.batch_size)
  K = int(iw_samples or e.iw_samples)
  model = HVAE(ModelConfig.from_config(config))
  params = ladder.init(model, jax.random.PRNGKey(0))
  batch = _batch(B)
  image, mask = batch["image"], batch["mask"]
  rng = jax.random.PRNGKey(1)
  chunk = iw.chunk_size(K, B)
  calls = math.ceil(K / chunk)
  out = {"batch_size": B, "iw_samples": K, "iw_chunk": chunk,
         "num_levels": model.config.num_levels}

  fwd = forward_fn(model)
  out["forward_compile_s"], out["forward_s"] = _timed(
      lambda: jax.block_until_ready(fwd(params, image, mask, rng)), repeats)
  forward_flops = _flops(fwd, params, image, mask, rng)
  out["forward_flops"] = forward_flops

  def record(name, first, per_batch, flops):
    out[f"{name}_compile_s"], out[f"{name}_s"] = first, per_batch
    out[f"{name}_s_per_example"] = per_batch / B
    out[f"{name}_forwards"] = per_batch / out["forward_s"]
    out[f"{name}_flop_forwards"] = flops / forward_flops

  first, per_batch = _timed(lambda: iw.log_weights(model, params, image, mask, rng, K), repeats)
  features_fn = iw.make_features_fn(model)
  features = features_fn(params, image, mask)
  flops = (_flops(features_fn, params, image, mask) + calls * _flops(
      iw.make_log_weights_fn(model, chunk), params, image, mask, rng, features))
  record("iw", first, per_batch, flops)
  out["iw_per_k"] = out["iw_forwards"] / K
  if previous:
    first, per_batch = _timed(lambda: iw.log_weights(model, params, image, mask, rng, K,
                                                     share_trunk=False), repeats)
    flops = calls * _flops(iw.make_log_weights_fn(model, chunk, share_trunk=False), params,
                           image, mask, rng)
    record("iw_previous", first, per_batch, flops)
    out["iw_previous_per_k"] = out["iw_previous_forwards"] / K

  if model.config.has_latents:
    mesh = make_mesh(jax.devices()[:1])
    swap_step = diagnostics.make_swap_step(model, mesh)
    arrays, _ = prepare(batch, mesh)
    on_mesh = replicate(params, mesh)
    first, per_batch = _timed(
        lambda: jax.block_until_ready(swap_step(on_mesh, arrays, rng)), repeats)
    record("swap", first, per_batch, _flops(swap_step, on_mesh, arrays, rng))

  out["eval_forwards"] = evaluation_forwards(config)["total"]
  out["eval_estimate_s"] = out["eval_forwards"] * out["forward_s"] / B
  if evaluator:
    out["evaluator_s"] = _time_evaluator(config, model, params, repeats)
    out["evaluator_forwards"] = out["evaluator_s"] / (out["forward_s"] / B)
  return out


def _time_evaluator(config, model: HVAE, params, repeats: int) -> float:
  """One training-time evaluation (warm, median), on synthetic images of config.eval's sizes."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.source = "synthetic"
  e = config.eval
  mesh = make_mesh(jax.devices()[:1])
  eval_sets = {"eval": data.eval_batches(config, "validation", e.num_examples, e.batch_size),
               "eval_train": data.eval_batches(config, "train", e.num_examples, e.batch_size)}
  grid_batch = data.eval_batches(config, "validation", e.num_grid_examples, e.num_grid_examples,
                                 process_index=0, process_count=1)[0]
  on_mesh = replicate(params, mesh)
  keys = jax.random.split(jax.random.PRNGKey(2))
  runner = evaluation.Evaluator(config, model, mesh, eval_sets, grid_batch, rng=keys[0],
                                grid_rng=keys[1])
  return _timed(lambda: runner(on_mesh, 0), repeats)[1]


def rows(result: dict, config_name: str = "") -> list[tuple[str, str]]:
  """The printed table: (quantity, value) rows of a `measure` result."""
  r = result
  B, K = r["batch_size"], r["iw_samples"]
  device = jax.devices()[0]
  out = [("config", config_name), ("devices", f"1 x {device.device_kind}"),
         ("evaluation batch B", B), ("levels L", r["num_levels"]),
         ("forward pass at B (the unit), compile s / s per batch",
          f"{r['forward_compile_s']:.2f} / {r['forward_s']:.4f}"),
         ("forward pass, s per example", f"{r['forward_s'] / B:.5f}"),
         ("forward pass, XLA FLOPs per example", f"{r['forward_flops'] / B:.3e}")]
  passes = [("iw", f"IW bound K={K} (trunk shared, chunk {r['iw_chunk']})")]
  if "iw_previous_s" in r:
    passes.append(("iw_previous", f"IW bound K={K}, K full forward passes (before)"))
  if "swap_s" in r:
    passes.append(("swap", f"swap pass ({r['num_levels'] + 1} = L + 1 passes written)"))
  for key, name in passes:
    out += [(f"{name}: first call (compile + run), s", f"{r[key + '_compile_s']:.2f}"),
            (f"{name}: s per example", f"{r[key + '_s_per_example']:.5f}"),
            (f"{name}: forward passes per example (time)", f"{r[key + '_forwards']:.2f}"),
            (f"{name}: forward passes per example (XLA FLOPs)",
             f"{r[key + '_flop_forwards']:.2f}")]
    if key.startswith("iw"):
      out.append((f"{name}: per sample, x one forward pass (time; target <= 1.5)",
                  f"{r[key + '_per_k']:.3f}"))
  out += [("training-time evaluation, forward passes (estimate from config.eval)",
           f"{r['eval_forwards']:.0f}"),
          ("training-time evaluation, s (estimate: its forward passes only)",
           f"{r['eval_estimate_s']:.2f}")]
  if "evaluator_s" in r:
    out += [("training-time evaluation, s (measured, warm)", f"{r['evaluator_s']:.2f}"),
            ("training-time evaluation, forward passes (measured)",
             f"{r['evaluator_forwards']:.0f}")]
  return out


def main(argv, flag_values: dict):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  result = measure(f["config"], batch_size=f["batch_size"], iw_samples=f["iw_samples"],
                   repeats=f["repeats"], previous=f["previous"], evaluator=f["evaluator"])
  print("| quantity | value |\n|---|---|")
  for k, v in rows(result, flags.FLAGS["config"].config_filename):
    print(f"| {k} | {v} |")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
