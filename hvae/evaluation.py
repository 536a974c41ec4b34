"""Evaluation passes: the unweighted bound and its per-level parts over a fixed set of examples.

`eval/` runs over held-out examples and `eval_train/` over the same number of training-split
examples with the same masks, both with the EMA parameters and no dropout; `gap/` is their
difference. Per-example terms are gathered to the host and reduced there, so dataset bits/dim
are sum(nats) / (sum(D) ln 2) exactly, over however many devices ran the pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hvae import objective, sampling
from hvae.model.ladder import HVAE
from hvae.train import DATA_AXIS, latent_dims, shard_batch

LN2 = objective.LN2
QUANTILES = {"kl_p50": 50, "kl_p90": 90, "kl_p99": 99, "kl_max": 100}


def _eval_step(params, batch, rng, *, model: HVAE):
  """Per-example terms (batch-sharded) and weighted sums over the batch (replicated)."""
  out = model.apply({"params": params}, batch["image"], batch["mask"], rngs={"sample": rng})
  terms = objective.elbo_terms(out, batch["mask"])
  per_example = {"recon": terms.recon, "kl": terms.kl, "num_dims": terms.num_dims}
  sums = {}
  w = batch["weight"]
  wsum = lambda x: jnp.tensordot(w, x, axes=1)  # noqa: E731  sum over real examples
  if out.levels:
    mean_log = lambda t: t.reshape(t.shape[0], -1).mean(-1)  # noqa: E731
    per_example["q_log_sigma"] = jnp.stack([mean_log(lev.q.log_scale) for lev in out.levels], -1)
    per_example["p_log_sigma"] = jnp.stack([mean_log(lev.p.log_scale) for lev in out.levels], -1)
    for l, lev in enumerate(out.levels, start=1):
      # Moments of the posterior mean over examples, for active units (Burda et al. 2016).
      sums[f"q_mean/{l}"] = wsum(lev.q.mean)
      sums[f"q_mean_sq/{l}"] = wsum(jnp.square(lev.q.mean))
      if lev.kl.ndim == 4:  # 2-D level: KL per position, for the spatial heatmaps
        sums[f"kl_map/{l}"] = wsum(lev.kl.sum(-1))
  return {"per_example": per_example, "sums": sums}


def make_eval_step(model: HVAE, mesh: Mesh):
  """Jits the eval step: (params, batch, rng) -> per-example terms and batch sums."""
  data, replicated = NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())
  return jax.jit(functools.partial(_eval_step, model=model),
                 in_shardings=(replicated, data, replicated),
                 out_shardings={"per_example": data, "sums": replicated})


def _pad(batch: dict, multiple: int) -> tuple[dict, int]:
  """Pads a batch to a multiple of the device count (repeating the last example)."""
  n = batch["image"].shape[0]
  pad = (-n) % multiple
  if pad:
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
  return batch, n


def prepare(batch: dict, mesh: Mesh) -> tuple[dict, np.ndarray]:
  """A host eval batch -> (global arrays with image/mask/weight, host weights).

  Batches may carry a `weight` [B] (0 = padding, as `hvae.data.eval_batches` pads the last
  batch); rows added here to fill every device get weight 0 too.
  """
  weight = np.asarray(batch.get("weight", np.ones(batch["image"].shape[0], np.float32)),
                      np.float32)
  padded, n = _pad({"image": batch["image"], "mask": batch["mask"], "weight": weight},
                   len(mesh.local_devices))
  padded["weight"] = padded["weight"].copy()
  padded["weight"][n:] = 0.0
  return shard_batch(padded, mesh), padded["weight"]


def run_pass(eval_step, params, batches: list[dict], rng, mesh: Mesh) -> dict:
  """Runs `eval_step` over `batches`.

  Returns:
    {"per_example": numpy arrays over the real examples, "sums": numpy sums, "count": N}.
  """
  per_example, sums, count = [], {}, 0
  for i, batch in enumerate(batches):
    arrays, _ = prepare(batch, mesh)
    out = eval_step(params, arrays, jax.random.fold_in(rng, i))
    gathered = multihost_utils.process_allgather(
        {"x": out["per_example"], "w": arrays["weight"]}, tiled=True)
    keep = np.asarray(gathered["w"]) > 0
    per_example.append({k: np.asarray(v)[keep] for k, v in gathered["x"].items()})
    count += int(keep.sum())
    for k, v in jax.device_get(out["sums"]).items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  return {"per_example": {k: np.concatenate([r[k] for r in per_example])
                          for k in per_example[0]},
          "sums": sums, "count": count}


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


def summarize(terms: dict, dims: tuple[int, ...], sums: dict | None = None,
              count: int = 0) -> dict[str, float]:
  """Dataset metrics of one pass (names of DESIGN §7 without the split prefix).

  Args:
    terms: per-example arrays from `run_pass`.
    dims: latent dimensions of every level.
    sums: batch sums from `run_pass` (posterior-mean moments) for active units.
    count: number of examples the sums are over.
  """
  nats_to_bpd = 1.0 / (terms["num_dims"].sum() * LN2)
  kl = terms["kl"]  # [N, L]
  metrics = {"bpd": float((terms["recon"].sum() + kl.sum()) * nats_to_bpd),
             "recon_bpd": float(terms["recon"].sum() * nats_to_bpd)}
  for l in range(kl.shape[1]):
    name = f"level_{l + 1}"
    metrics[f"kl/{name}"] = float(kl[:, l].mean())
    metrics[f"kl_bpd/{name}"] = float(kl[:, l].sum() * nats_to_bpd)
    metrics[f"kl_per_dim/{name}"] = float(kl[:, l].mean() / dims[l])
    for key, q in QUANTILES.items():
      metrics[f"{key}/{name}"] = float(np.percentile(kl[:, l], q))
    if "q_log_sigma" in terms:
      metrics[f"q_log_sigma/{name}"] = float(terms["q_log_sigma"][:, l].mean())
      metrics[f"p_log_sigma/{name}"] = float(terms["p_log_sigma"][:, l].mean())
    if sums and count > 1 and f"q_mean/{l + 1}" in sums:
      mean = sums[f"q_mean/{l + 1}"] / count
      var = sums[f"q_mean_sq/{l + 1}"] / count - np.square(mean)
      metrics[f"active_units/{name}"] = float(np.mean(var > ACTIVE_UNIT_THRESHOLD))
  return metrics


def evaluate_passes(eval_step, params, eval_sets: dict[str, list[dict]], rng, mesh: Mesh,
                    model: HVAE) -> tuple[dict[str, float], dict[str, dict]]:
  """Runs every pass (e.g. {"eval": ..., "eval_train": ...}) and adds the `gap/` metrics.

  Returns:
    (metrics, passes): DESIGN §7 names, and each pass's `run_pass` results (for diagnostics).
  """
  dims = latent_dims(model.config)
  metrics, passes = {}, {}
  for split, batches in eval_sets.items():
    passes[split] = r = run_pass(eval_step, params, batches, rng, mesh)
    m = summarize(r["per_example"], dims, r["sums"], r["count"])
    metrics.update({f"{split}/{k}": v for k, v in m.items()})
  if "eval" in eval_sets and "eval_train" in eval_sets:
    metrics["gap/bpd"] = metrics["eval/bpd"] - metrics["eval_train/bpd"]
    for l in range(1, len(dims) + 1):
      metrics[f"gap/kl/level_{l}"] = metrics[f"eval/kl/level_{l}"] - metrics[
          f"eval_train/kl/level_{l}"]
  return metrics, passes


def make_fill_in_fn(model: HVAE, num_samples: int):
  """Jitted (params, image, mask, rng) -> [N, B, 64, 64, 3] composited samples."""
  return jax.jit(functools.partial(_fill_ins, model=model, num_samples=num_samples))


def _fill_ins(params, image, mask, rng, *, model, num_samples):
  return sampling.sample_fill_ins(model, params, image, mask, rng, num_samples=num_samples)


def make_mode_fn(model: HVAE):
  """Jitted (params, image, mask) -> [B, 64, 64, 3] mode fill-in."""
  return jax.jit(functools.partial(sampling.mode_fill_in, model))


GRID_EXTRA_COLUMNS = ("mean", "mode")


def fill_in_grid_rows(samples: np.ndarray, image: np.ndarray, mask: np.ndarray,
                      mode: np.ndarray | None = None) -> list:
  """Rows of an image grid, one per example: context | truth | samples ... | mean | [mode]."""
  from hvae import images

  samples = np.asarray(samples)  # [N, B, 64, 64, 3]
  context = images.hole_overlay(np.asarray(image), np.asarray(mask))
  mean = np.asarray(sampling.mean_fill_in(jnp.asarray(samples)))
  cols = [context, np.asarray(image)] + list(samples) + [mean]
  if mode is not None:
    cols.append(np.asarray(mode))
  return [np.stack([c[b] for c in cols]) for b in range(image.shape[0])]
