"""Per-level diagnostics (issue: "which level overfits, and why").

* `swap/level_l`: the posterior->prior swap. Levels above l from the posterior, level l from
  its conditional prior given them (same noise), levels below from the posterior (for top_down,
  given the new path); the drop in reconstruction log-likelihood of the missing region, nats
  per image. How much of the fill-in level l carries, on held-out vs training examples.
* Worst examples per level: the held-out examples with the largest KL at each level.
* Resample one level: every level keeps its noise except level l, whose noise is redrawn; the
  pixels are the likelihood's mode, so each row shows what level l alone controls.
* Spatial KL heatmaps of the 2-D levels, held-out next to training-split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hvae import grids, metric_names, objective, preemption, sampling
from hvae.mesh import prepare, shardings, take_rows
from hvae.model.ladder import HVAE, POSTERIOR, PRIOR


def _swap_step(params, batch, rng, *, model: HVAE):
  """[B, L]: recon nats with level l from the prior minus recon with every level from q."""
  L = model.config.num_levels

  def recon(sources):
    out = model.apply({"params": params}, batch["image"], batch["mask"], sources=sources,
                      compute_posterior=True, rngs={"sample": rng})
    return objective.elbo_terms(out, batch["mask"]).recon

  # The same rng for every pass, deliberately: each level draws the same eps in every pass, so
  # the swap is a paired comparison (only level l's source differs), not two noisy estimates.
  base = recon(POSTERIOR)
  swaps = [recon(tuple(PRIOR if k == l else POSTERIOR for k in range(L))) - base
           for l in range(L)]
  return jnp.stack(swaps, axis=-1)


@functools.lru_cache(maxsize=4)
def make_swap_step(model: HVAE, mesh: Mesh):
  data, replicated = shardings(mesh)
  return jax.jit(functools.partial(_swap_step, model=model),
                 in_shardings=(replicated, data, replicated), out_shardings=data)


def swap_metrics(swap_step, params, batches: list[dict], rng, mesh: Mesh,
                 interrupt=None) -> dict[str, float]:
  """`swap/level_l` (without the split prefix): mean over the real examples of `batches`;
  `interrupt()`, if given, is asked before every batch (`hvae.preemption.check`)."""
  rows = []
  for i, batch in enumerate(batches):
    preemption.check(interrupt)
    arrays, _ = prepare(batch, mesh)
    out = swap_step(params, arrays, jax.random.fold_in(rng, i))
    g = multihost_utils.process_allgather({"s": out, "w": arrays["weight"]}, tiled=True)
    rows.append(np.asarray(g["s"])[np.asarray(g["w"]) > 0])
  swaps = np.concatenate(rows)
  return {metric_names.name("swap", level=l + 1): float(swaps[:, l].mean())
          for l in range(swaps.shape[1])}


def _resample_step(params, image, mask, rng, *, model: HVAE, num_samples: int):
  """[L, S, C, 64, 64, 3]: for each level, S mode fill-ins where only that level's noise varies."""
  cfg = model.config
  L, C = cfg.num_levels, image.shape[0]
  shapes = [cfg.latent_shape(l) for l in range(1, L + 1)]
  base_key, redraw_key = jax.random.split(rng)
  base = [jax.random.normal(jax.random.fold_in(base_key, l), (C,) + s)
          for l, s in enumerate(shapes)]
  noise = []  # per level: [L * S * C, *shape], row-major over (level varied, sample, context)
  for l, s in enumerate(shapes):
    fresh = jax.random.normal(jax.random.fold_in(redraw_key, l), (num_samples, C) + s)
    fixed = jnp.broadcast_to(base[l], (num_samples, C) + s)
    per_varied = [fresh if v == l else fixed for v in range(L)]
    noise.append(jnp.stack(per_varied).reshape((L * num_samples * C,) + s))
  reps = L * num_samples
  context = sampling.composite(image, jnp.zeros_like(image, jnp.float32), mask)
  tiled = jnp.tile(context, (reps, 1, 1, 1))
  tiled_mask = jnp.tile(jnp.asarray(mask, jnp.float32), (reps, 1, 1, 1))
  out = model.apply({"params": params}, tiled, tiled_mask, sources=PRIOR, noise=noise,
                    compute_posterior=False, rngs={"sample": rng})
  filled = sampling.composite(tiled, model.likelihood.mode(out.px_params), tiled_mask)
  return filled.reshape((L, num_samples, C) + filled.shape[1:])


@functools.lru_cache(maxsize=4)
def make_resample_fn(model: HVAE, num_samples: int):
  return jax.jit(functools.partial(_resample_step, model=model, num_samples=num_samples))


def resample_grid(resampled: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """One row per (context, level): context, then the samples varying only that level."""
  resampled = np.asarray(resampled)  # [L, S, C, 64, 64, 3]
  L, _, C = resampled.shape[:3]
  context = grids.hole_overlay(np.asarray(image), np.asarray(mask))
  rows, row_labels = [], []
  for c in range(C):
    for l in range(L):
      rows.append(np.concatenate([context[c:c + 1], resampled[l, :, c]]))
      row_labels.append(f"level {l + 1}")  # the level whose noise varies along the row
  # Rows: context 1 with level 1, 2, ..., L varied, then context 2, ...
  labels = ["context"] + [f"sample {s + 1}" for s in range(resampled.shape[1])]
  return grids.make_grid(rows, labels=labels, scale=2, row_labels=row_labels)


def worst_examples(kl: np.ndarray, batches: list[dict], per_level: int,
                   where: np.ndarray | None = None) -> dict[int, dict]:
  """The held-out examples with the largest KL at each level.

  Args:
    kl: [N, L] per-example KL of the pass over `batches` (real examples, in order).
    batches: the pass's host batches (padding rows have weight 0).
    per_level: how many examples per level.
    where: [N, 3] (process, batch, row) of each example, from `hvae.evaluation.run_pass`:
      with several processes each holds only its rows of `batches`, and the chosen ones are
      gathered from their holders (a collective: every process calls this). None: `batches`
      hold every example (one process).

  Returns:
    {level: {"image", "mask", "kl"}} with `per_level` examples each, largest KL first.
  """
  picks = {l + 1: np.argsort(-kl[:, l])[:per_level] for l in range(kl.shape[1])}
  if where is None:  # this process's real rows, in order
    where = np.asarray([(jax.process_index(), i, r) for i, b in enumerate(batches)
                        for r in np.flatnonzero(b.get("weight", np.ones(len(b["image"]))) > 0)])
  taken = take_rows(batches, where, np.concatenate(list(picks.values())))  # one collective
  out, start = {}, 0
  for level, idx in picks.items():
    out[level] = {"image": taken["image"][start:start + len(idx)],
                  "mask": taken["mask"][start:start + len(idx)], "kl": kl[idx, level - 1]}
    start += len(idx)
  return out


def kl_heatmap_grid(eval_sums: dict, train_sums: dict, eval_count: int, train_count: int,
                    num_levels: int) -> np.ndarray | None:
  """One row per 2-D level: held-out mean KL map | training-split mean KL map (shared scale)."""
  rows, row_labels = [], []
  for l in range(1, num_levels + 1):
    key = f"kl_map/{l}"
    if key not in eval_sums or key not in train_sums:
      continue
    held, train = eval_sums[key] / max(eval_count, 1), train_sums[key] / max(train_count, 1)
    vmax = float(max(held.max(), train.max(), 1e-8))
    rows.append(np.stack([grids.heatmap(held, 64, vmax), grids.heatmap(train, 64, vmax)]))
    row_labels.append(f"level {l}")
  if not rows:
    return None
  return grids.make_grid(rows, labels=["held-out KL", "train-split KL"], scale=2,
                          row_labels=row_labels)
