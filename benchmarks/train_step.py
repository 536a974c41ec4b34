"""Benchmark of one jitted train step on synthetic in-memory batches.

  python -m benchmarks.train_step --config=experiments/quickstart.py
  python -m benchmarks.train_step --config=experiments/celeba_l4.py --batch_size=8

Prints the compile time (trace, lower and XLA compile of the step, cold: no persistent cache),
the first and second step times, the median steady-state step time over
`--steps` steps (steps/s, images/s), XLA's cost-analysis FLOPs per step, the achieved FLOP/s as
a fraction of this machine's float32 matmul rate (measured in the same run), and peak memory
(device statistics where the backend has them, else XLA's memory analysis and host RSS).
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hvae import train
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.model.ladder import HVAE
from hvae.typed_config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steady-state steps (median reported).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override train.batch_size (0 = config's).")


def matmul_flops_per_sec(n: int = 2048, repeats: int = 10) -> float:
  """This machine's float32 matmul rate (best of `repeats`)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _batch(batch_size: int, seed: int) -> dict:
  rs = np.random.RandomState(seed)
  mask = np.ones((batch_size, 64, 64, 1), np.float32)
  mask[:, 16:48, 16:48] = 0
  return {"image": rs.randint(0, 256, (batch_size, 64, 64, 3)).astype(np.uint8), "mask": mask}


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    with config.unlocked():
      config.train.batch_size = _BATCH.value
  batch_size = config.train.batch_size
  mesh = make_mesh()
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = replicate(train.create_train_state(model, tx, jax.random.PRNGKey(0)), mesh)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  step = train.make_train_step(config, model, tx, mesh)
  rng = replicate(jax.random.PRNGKey(1), mesh)
  batches = [shard_batch(_batch(batch_size, i), mesh) for i in range(4)]

  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()

  t0 = time.perf_counter()
  state, metrics = step(state, batches[0], rng)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = step(state, batches[1], rng)
  jax.block_until_ready(metrics)
  second = time.perf_counter() - t0
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)], rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  peak = matmul_flops_per_sec()

  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  rows = [
      ("config", flags.FLAGS["config"].config_filename),
      ("devices", f"{jax.device_count()} x {device.device_kind}"),
      ("parameters", f"{num_params:,}"),
      ("global batch", batch_size),
      ("compile (trace + lower + XLA, cold cache), s", f"{compile_s:.2f}"),
      ("first step after compile, s", f"{first:.3f}"),
      ("second step, s", f"{second:.3f}"),
      (f"median step of {_STEPS.value}, s", f"{median:.4f}"),
      ("steps/s", f"{1 / median:.2f}"),
      ("images/s", f"{batch_size / median:.1f}"),
      ("XLA FLOPs per step", f"{flops:.3e}"),
      ("achieved FLOP/s", f"{flops / median:.3e}"),
      ("float32 matmul FLOP/s (this machine)", f"{peak:.3e}"),
      ("achieved / matmul rate", f"{flops / median / peak:.3f}"),
  ]
  if "peak_bytes_in_use" in stats:
    rows.append(("device peak memory, MiB", f"{stats['peak_bytes_in_use'] / 2**20:.0f}"))
  if mem is not None:
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    rows.append(("XLA memory (args+temps+outputs-aliased), MiB", f"{total / 2**20:.0f}"))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  rows.append(("host peak RSS, MiB", f"{rss:.0f}"))
  print("| quantity | value |\n|---|---|")
  for k, v in rows:
    print(f"| {k} | {v} |")


if __name__ == "__main__":
  app.run(main)
