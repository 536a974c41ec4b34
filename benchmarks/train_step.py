"""Benchmark of one jitted train step on synthetic in-memory batches: how long will my run take?

  python -m benchmarks.train_step --config=experiments/quickstart.py
  python -m benchmarks.train_step --config=experiments/celeba_l4.py --batch_size=8

Prints the compile time (trace, lower and XLA compile of the step; cold unless a persistent
compilation cache is configured, which the table says), the first and second step times, the
median steady-state step time over `--steps` steps (steps/s, images/s), the FLOPs per step
(XLA's cost analysis of the lowered step, the same on every backend), the achieved FLOP/s as a
fraction of this machine's matmul rate (the median of `--matmul_repeats` >= 20 timed n x n
matmuls in the same process: float32, n = 2048 by default; on an accelerator
`--matmul_size=8192 --matmul_dtype=bfloat16`, see benchmarks/accelerator.sh), peak memory
(device statistics where the backend has them, else XLA's memory analysis and host RSS), and the
ETA of the config's `train.num_steps`: steps x the median step time, then with an estimate of
the evaluations (`eval.every_steps` and the last step; each one `eval_cost.evaluation_forwards`
forward passes at the forward-pass time measured here, at the train batch; fixed costs such as
host transfers, images and the evaluation's own compiles are not in it, and weigh most for tiny
models: `python -m benchmarks.eval_cost --evaluator` measures one evaluation;
`--eval_estimate=false` skips the estimate).

Any config override (`--config.model.compute_dtype=bfloat16`, ...) times the step with that
setting. Beside the wall clock it gives the process's CPU time per step (user + system, all
threads: on a machine shared with other work the better comparison of two settings) and the
minor page faults per step (XLA allocates each step's temporaries afresh; large ones are mapped
and unmapped every step).

`measure(config)` returns the figures as a dict (tests/test_benchmarks.py); training runs log
the same step time and ETA from their own first steps (hvae/eta.py).
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import eval_cost
from hvae import eta, sweep, train
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.model.ladder import HVAE
from hvae.typed_config import ModelConfig


def _define_flags() -> dict:
  """The command line (defined when run as a script only: tests and eval_cost import this)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment file.",
                                                lock_config=True),
      "steps": flags.DEFINE_integer("steps", 20, "Timed steady-state steps (median reported)."),
      "batch_size": flags.DEFINE_integer("batch_size", 0,
                                         "Override train.batch_size (0 = config's)."),
      "matmul_repeats": flags.DEFINE_integer("matmul_repeats", 20,
                                             "Timed matmuls (median reported).", lower_bound=20),
      "matmul_size": flags.DEFINE_integer("matmul_size", MATMUL_SIZE,
                                          "n of the n x n reference matmul (on a GPU use 8192: "
                                          "2048 is too small to reach its rate).", lower_bound=64),
      "matmul_dtype": flags.DEFINE_enum("matmul_dtype", "float32", ["float32", "bfloat16"],
                                        "dtype of the reference matmul: bfloat16 gives the "
                                        "accelerator's bf16 rate, the figure to compare a "
                                        "model.compute_dtype=bfloat16 step with."),
      "eval_estimate": flags.DEFINE_bool("eval_estimate", True, "Estimate the evaluations' share "
                                         "of the run (one extra compile: a forward pass)."),
  }


MATMUL_SIZE = 2048


def matmul_flops_per_sec(n: int = MATMUL_SIZE, repeats: int = 20,
                         dtype: str = "float32") -> float:
  """This machine's matmul rate: the median of `repeats` timed n x n matmuls in `dtype`, FLOP/s.

  The median, not the best: it is what the train step's median is compared with, in the same
  process and under the same load.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / float(np.median(times))


def _batch(batch_size: int, seed: int) -> dict:
  rs = np.random.RandomState(seed)
  mask = np.ones((batch_size, 64, 64, 1), np.float32)
  mask[:, 16:48, 16:48] = 0
  return {"image": rs.randint(0, 256, (batch_size, 64, 64, 3)).astype(np.uint8), "mask": mask}


def _forward_seconds_per_image(model: HVAE, params, batch_size: int, repeats: int = 3) -> float:
  """One forward pass (eval_cost's unit) at `batch_size` on the first device, s per image."""
  fwd = eval_cost.forward_fn(model)
  batch = _batch(batch_size, 0)
  args = (jax.device_get(params), batch["image"], batch["mask"], jax.random.PRNGKey(2))
  jax.block_until_ready(fwd(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) / batch_size


def measure(config, *, steps: int = 20, matmul_size: int = MATMUL_SIZE,
            matmul_repeats: int = 20, eval_estimate: bool = True,
            matmul_dtype: str = "float32") -> dict:
  """Times `config`'s train step at train.batch_size on every device, and the run's ETA.

  Args:
    config: the experiment config (train.batch_size is the global batch).
    steps: timed steady-state steps (median).
    matmul_size: n of the n x n matmul the step is compared with.
    matmul_repeats: timed matmuls (median).
    matmul_dtype: dtype of that matmul ("float32", or "bfloat16" for an accelerator's bf16 rate).
    eval_estimate: also estimate the evaluations (forward-pass time x `evaluation_forwards`).

  Returns:
    {"num_params", "batch_size", "num_devices", "device_kind", "compile_s" (of which
     "lower_s" is tracing and lowering, the rest XLA's compilation), "first_step_s",
     "second_step_s", "median_step_s", "steps_per_s", "images_per_s", "median_step_cpu_s"
     (process CPU seconds, all threads), "page_faults_per_step" (minor), "flops_per_step"
     (the lowered step's: the same on every backend), "compiled_flops_per_step",
     "achieved_flops_per_s", "matmul_flops_per_s", "matmul_fraction", "device_peak_mib" (None
     where the backend has no statistics), "xla_memory_mib" (None without memory analysis),
     "host_peak_rss_mib", "compilation_cache" (its folder, or ""), "matmul_dtype",
     "matmul_size", "compute_dtype", "num_steps", "eta_steps_s"
     (num_steps x median step)}; with `eval_estimate` also "forward_s_per_image",
    "eval_forwards", "eval_s", "num_evaluations", "eta_total_s" and "eval_share".
  """
  batch_size = int(config.train.batch_size)
  mesh = make_mesh()
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = replicate(train.create_train_state(model, tx, jax.random.PRNGKey(0)), mesh)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  step = train.make_train_step(config, model, tx, mesh)
  rng = replicate(jax.random.PRNGKey(1), mesh)
  batches = [shard_batch(_batch(batch_size, i), mesh) for i in range(4)]

  t0 = time.perf_counter()
  lowered = step.lower(state, batches[0], rng)
  lower_s = time.perf_counter() - t0  # tracing the Python model and lowering it to StableHLO
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # The rate uses the lowered step's FLOPs (eta.xla_flops, sweep.train_step_flops say why); the
  # compiled step's, one device's share, is reported beside it. The share is per device.
  flops = (eta.xla_flops(lowered)  # where the backend cannot cost it, lowered again for the CPU
           or sweep.train_step_flops(config)["flops_per_step"] or float("nan"))
  compiled_flops = eta.xla_flops(compiled) or float("nan")
  mem = compiled.memory_analysis()

  cpu_times = []

  def timed_step(i: int) -> float:
    nonlocal state
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batches[i % len(batches)], rng)
    jax.block_until_ready(metrics)
    cpu_times.append(time.process_time() - c0)
    return time.perf_counter() - t0

  first, second = timed_step(0), timed_step(1)
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  median = float(np.median([timed_step(i) for i in range(max(steps, 1))]))
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(steps, 1)
  median_cpu = float(np.median(cpu_times[2:]))
  peak = matmul_flops_per_sec(matmul_size, matmul_repeats, matmul_dtype)

  stats = jax.devices()[0].memory_stats() or {}
  xla_mib = None
  if mem is not None:
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    xla_mib = total / 2**20
  num_steps = int(config.train.num_steps)
  out = {
      "num_params": int(num_params), "batch_size": batch_size,
      "num_devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
      "compile_s": compile_s, "lower_s": lower_s, "first_step_s": first, "second_step_s": second,
      "median_step_s": median, "steps_per_s": 1 / median, "images_per_s": batch_size / median,
      "median_step_cpu_s": median_cpu, "page_faults_per_step": faults,
      "flops_per_step": flops, "compiled_flops_per_step": compiled_flops,
      "achieved_flops_per_s": flops / median,
      "matmul_flops_per_s": peak, "matmul_fraction": flops / median / peak / jax.device_count(),
      "device_peak_mib": (stats["peak_bytes_in_use"] / 2**20
                          if "peak_bytes_in_use" in stats else None),
      "xla_memory_mib": xla_mib,
      "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "compilation_cache": jax.config.jax_compilation_cache_dir or "",
      "matmul_dtype": matmul_dtype, "matmul_size": matmul_size,
      "compute_dtype": str(config.model.get("compute_dtype", "float32")),
      "num_steps": num_steps, "eta_steps_s": num_steps * median,
  }
  if eval_estimate:
    per_image = _forward_seconds_per_image(model, state.params, batch_size)
    forwards = eval_cost.evaluation_forwards(config)["total"]
    evaluations = eta.num_evaluations(num_steps, config.eval.every_steps)
    eval_s = forwards * per_image
    total = out["eta_steps_s"] + evaluations * eval_s
    out.update(forward_s_per_image=per_image, eval_forwards=forwards, eval_s=eval_s,
               num_evaluations=evaluations, eta_total_s=total,
               eval_share=evaluations * eval_s / total if total > 0 else float("nan"))
  return out


def rows(r: dict, config_name: str = "", steps: int = 20,
         matmul_repeats: int = 20) -> list[tuple[str, object]]:
  """The printed table: (quantity, value) rows of a `measure` result."""
  cache = r["compilation_cache"]
  out = [
      ("config", config_name),
      ("devices", f"{r['num_devices']} x {r['device_kind']}"),
      ("parameters", f"{r['num_params']:,}"),
      ("global batch", r["batch_size"]),
      ("compile (trace + lower + XLA, cold cache), s" if not cache else
       "compile (trace + lower + XLA, persistent cache on), s", f"{r['compile_s']:.2f}"),
      ("  of which trace + lower, s", f"{r['lower_s']:.2f}" if "lower_s" in r else "—"),
      ("first step after compile, s", f"{r['first_step_s']:.3f}"),
      ("second step, s", f"{r['second_step_s']:.3f}"),
      (f"median step of {steps}, s", f"{r['median_step_s']:.4f}"),
      ("steps/s", f"{r['steps_per_s']:.2f}"),
      ("images/s", f"{r['images_per_s']:.1f}"),
      (f"median step of {steps}, CPU s (process, all threads)",
       f"{r.get('median_step_cpu_s', float('nan')):.4f}"),
      ("minor page faults per step", f"{r.get('page_faults_per_step', float('nan')):.0f}"),
      ("FLOPs per step (XLA cost analysis of the lowered step)", f"{r['flops_per_step']:.3e}"),
      ("FLOPs per step and device (compiled; misses library calls such as cuDNN's)",
       f"{r.get('compiled_flops_per_step', float('nan')):.3e}"),
      ("achieved FLOP/s", f"{r['achieved_flops_per_s']:.3e}"),
      ("model.compute_dtype", r.get("compute_dtype", "float32")),
      (f"{r.get('matmul_dtype', 'float32')} {r.get('matmul_size', MATMUL_SIZE)}^3 matmul FLOP/s "
       f"(this machine, median of {matmul_repeats})",
       f"{r['matmul_flops_per_s']:.3e}"),
      ("achieved / matmul rate (per device)", f"{r['matmul_fraction']:.3f}"),
  ]
  if r["device_peak_mib"] is not None:
    out.append(("device peak memory, MiB", f"{r['device_peak_mib']:.0f}"))
  if r["xla_memory_mib"] is not None:
    out.append(("XLA memory (args+temps+outputs-aliased), MiB", f"{r['xla_memory_mib']:.0f}"))
  out.append(("host peak RSS, MiB", f"{r['host_peak_rss_mib']:.0f}"))
  n = r["num_steps"]
  out.append((f"ETA of train.num_steps = {n:,} steps (steps only)",
              eta.format_duration(r["eta_steps_s"])))
  if "eval_s" in r:
    out += [
        ("forward pass (posterior, no gradient), s per image",
         f"{r['forward_s_per_image']:.4f}"),
        ("evaluations in the run (every eval.every_steps, and the last step)",
         r["num_evaluations"]),
        ("one evaluation, forward passes (estimate from config.eval)",
         f"{r['eval_forwards']:.0f}"),
        ("one evaluation, s (estimate: its forward passes only)", f"{r['eval_s']:.1f}"),
        ("ETA with the evaluations (estimate)", eta.format_duration(r["eta_total_s"])),
        ("evaluations' share of the run (estimate)", f"{100 * r['eval_share']:.1f} %"),
    ]
  return out


def main(argv, flag_values: dict):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  config = f["config"]
  if f["batch_size"]:
    with config.unlocked():
      config.train.batch_size = f["batch_size"]
  result = measure(config, steps=f["steps"], matmul_repeats=f["matmul_repeats"],
                   eval_estimate=f["eval_estimate"], matmul_size=f["matmul_size"],
                   matmul_dtype=f["matmul_dtype"])
  print("| quantity | value |\n|---|---|")
  for k, v in rows(result, flags.FLAGS["config"].config_filename, f["steps"],
                   f["matmul_repeats"]):
    print(f"| {k} | {v} |")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
