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
  out = model.apply({"params": params}, batch["image"], batch["mask"], rngs={"sample": rng})
  terms = objective.elbo_terms(out, batch["mask"])
  return {"recon": terms.recon, "kl": terms.kl, "num_dims": terms.num_dims}


def make_eval_step(model: HVAE, mesh: Mesh):
  """Jits the per-example eval step: (params, batch, rng) -> per-example terms, batch-sharded."""
  data, replicated = NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())
  return jax.jit(functools.partial(_eval_step, model=model),
                 in_shardings=(replicated, data, replicated), out_shardings=data)


def _pad(batch: dict, multiple: int) -> tuple[dict, int]:
  """Pads a batch to a multiple of the device count (repeating the last example)."""
  n = batch["image"].shape[0]
  pad = (-n) % multiple
  if pad:
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
  return batch, n


def per_example_terms(eval_step, params, batches: list[dict], rng, mesh: Mesh) -> dict:
  """Runs `eval_step` over `batches`; returns numpy per-example arrays of the real examples.

  Batches may carry a `weight` [B] (0 = padding, as `hvae.data.eval_batches` pads the last
  batch); padded rows, and rows added here to fill every device, are dropped.
  """
  results = []
  local_devices = len(mesh.local_devices)
  for i, batch in enumerate(batches):
    weight = np.asarray(batch.get("weight", np.ones(batch["image"].shape[0], np.float32)))
    batch = {"image": batch["image"], "mask": batch["mask"], "weight": weight}
    padded, n = _pad(batch, local_devices)
    padded["weight"][n:] = 0.0
    out = eval_step(params, shard_batch({k: padded[k] for k in ("image", "mask")}, mesh),
                    jax.random.fold_in(rng, i))
    out["weight"] = shard_batch({"w": padded["weight"]}, mesh)["w"]
    out = multihost_utils.process_allgather(out, tiled=True)
    keep = np.asarray(out.pop("weight")) > 0
    results.append({k: np.asarray(v)[keep] for k, v in out.items()})
  return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def summarize(terms: dict, dims: tuple[int, ...]) -> dict[str, float]:
  """Dataset metrics of one pass (names of DESIGN §7 without the split prefix)."""
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
  return metrics


def evaluate_splits(eval_step, params, eval_sets: dict[str, list[dict]], rng, mesh: Mesh,
                    model: HVAE) -> dict[str, float]:
  """Runs every pass (e.g. {"eval": ..., "eval_train": ...}) and adds the `gap/` metrics."""
  dims = latent_dims(model.config)
  metrics = {}
  for split, batches in eval_sets.items():
    m = summarize(per_example_terms(eval_step, params, batches, rng, mesh), dims)
    metrics.update({f"{split}/{k}": v for k, v in m.items()})
  if "eval" in eval_sets and "eval_train" in eval_sets:
    metrics["gap/bpd"] = metrics["eval/bpd"] - metrics["eval_train/bpd"]
    for l in range(1, len(dims) + 1):
      metrics[f"gap/kl/level_{l}"] = metrics[f"eval/kl/level_{l}"] - metrics[
          f"eval_train/kl/level_{l}"]
  return metrics


def make_fill_in_fn(model: HVAE, num_samples: int):
  """Jitted (params, image, mask, rng) -> [N, B, 64, 64, 3] composited samples."""
  return jax.jit(functools.partial(_fill_ins, model=model, num_samples=num_samples))


def _fill_ins(params, image, mask, rng, *, model, num_samples):
  return sampling.sample_fill_ins(model, params, image, mask, rng, num_samples=num_samples)


def fill_in_grid_rows(samples: np.ndarray, image: np.ndarray, mask: np.ndarray) -> list:
  """Rows of an image grid: context | truth | samples ... | mean fill-in, one row per example."""
  from hvae import images

  samples = np.asarray(samples)  # [N, B, 64, 64, 3]
  context = images.hole_overlay(np.asarray(image), np.asarray(mask))
  mean = np.asarray(sampling.mean_fill_in(jnp.asarray(samples)))
  cols = [context, np.asarray(image)] + list(samples) + [mean]
  return [np.stack([c[b] for c in cols]) for b in range(image.shape[0])]
