"""Evaluation: the unweighted bound and its per-level parts over a fixed set of examples.

Why one file past ~350 lines: the per-example terms, their dataset summary and the
`Evaluator` that runs them at an evaluation step must agree name by name; splitting the
Evaluator out is part of the issue "Score any held-out images" (the evaluation branch).

`eval/` runs over held-out examples and `eval_train/` over the same number of training-split
examples with the same masks, both with the EMA parameters and no dropout; `gap/` is their
difference. Per-example terms are gathered to the host and reduced there, so dataset bits/dim
are sum(nats) / (sum(D) ln 2) exactly, over however many devices ran the pass.

* `per_example_elbo` / `make_elbo_fn`: the per-example terms of one forward pass, the one
  definition shared by the training-time passes, `hvae.load(...).elbo` and `--mode=eval`;
* `summarize`: the dataset figures of per-example terms (the same for every caller), among
  them `recon_bpd/{r,g_given_r,b_given_rg}`, recon split by the chain rule. They add up to
  `recon_bpd` exactly for the discrete likelihoods (`dmol`, `discretized_gaussian`) only: the
  continuous `gaussian` scores recon at randomly dequantised pixels and the channel terms at
  the bin centres, so there the sum differs from `recon_bpd` (by noise and the offset);
* `Evaluator`: everything the training loop does at an evaluation step (both passes, the
  per-level diagnostics of hvae/diagnostics.py, the verdict, the fill-in and diagnostic
  images); it returns (metrics, images) and writes nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hvae import (
  amortisation,
  diagnostics,
  grids,
  metric_names,
  objective,
  preemption,
  sampling,
  verdict,
)
from hvae.mesh import prepare, shardings
from hvae.model.ladder import HVAE
from hvae.train import latent_dims

# recon_bpd/{channel}: chain-rule parts (summing to recon_bpd for discrete likelihoods only)
CHANNELS = ("r", "g_given_r", "b_given_rg")
QUANTILES = {"kl_p50": 50, "kl_p90": 90, "kl_p99": 99, "kl_max": 100}


def per_example_elbo(model: HVAE, params, image, mask, rng):
  """One forward pass, latents from the posterior, reduced to per-example ELBO terms.

  Args:
    model: the model.
    params: its parameters.
    image: [B, 64, 64, 3] pixels in [0, 255].
    mask: [B, 64, 64, 1], 1 = given.
    rng: the `sample` stream's key.

  Returns:
    (the model's output, {"recon": [B], "kl": [B, L], "num_dims": [B], "recon_channels":
    [B, 3]} in nats); recon_channels splits recon by the chain rule into -log p(r),
    -log p(g | r), -log p(b | r, g) (exactly for the discrete likelihoods; the continuous one
    is scored at bin centres there).
  """
  out = model.apply({"params": params}, image, mask, rngs={"sample": rng})
  terms = objective.elbo_terms(out, mask)
  missing = 1.0 - jnp.asarray(mask, jnp.float32)
  channels = model.likelihood.channel_chain_log_prob(out.px_params, image)  # [B, 64, 64, 3]
  return out, {"recon": terms.recon, "kl": terms.kl, "num_dims": terms.num_dims,
               "recon_channels": -jnp.sum(channels * missing, axis=(1, 2))}


def _elbo(params, image, mask, rng, *, model: HVAE):
  return per_example_elbo(model, params, image, mask, rng)[1]


@functools.lru_cache(maxsize=4)
def make_elbo_fn(model: HVAE):
  """Jitted (params, image, mask, rng) -> the per-example terms of `per_example_elbo`."""
  return jax.jit(functools.partial(_elbo, model=model))


def _eval_step(params, batch, rng, *, model: HVAE):
  """Per-example terms (batch-sharded) and weighted sums over the batch (replicated)."""
  out, per_example = per_example_elbo(model, params, batch["image"], batch["mask"], rng)
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


@functools.lru_cache(maxsize=4)
def make_eval_step(model: HVAE, mesh: Mesh):
  """Jits the eval step: (params, batch, rng) -> per-example terms and batch sums. Built once
  per (model, mesh), like the evaluation's other functions: a second run in the same process
  (a sweep's next seed, a resumed run, a test) traces and compiles none of them again."""
  data, replicated = shardings(mesh)
  return jax.jit(functools.partial(_eval_step, model=model),
                 in_shardings=(replicated, data, replicated),
                 out_shardings={"per_example": data, "sums": replicated})


def _row_holders(mesh: Mesh, size: int, batch: int) -> np.ndarray:
  """[size, 3]: (process, batch, row of that process's host batch) of each row of a global
  batch split over the `data` axis (each process's rows lie on its devices, in mesh order)."""
  owner = np.repeat([d.process_index for d in mesh.devices.flat], size // mesh.devices.size)
  row = np.zeros(size, int)
  for p in np.unique(owner):
    row[owner == p] = np.arange(np.sum(owner == p))
  return np.stack([owner, np.full(size, batch), row], -1)


def run_pass(eval_step, params, batches: list[dict], rng, mesh: Mesh, interrupt=None) -> dict:
  """Runs `eval_step` over `batches`; `interrupt()`, if given, is asked before every batch
  (`preemption.Interrupted` when it says True; with several processes all must agree on it).

  Returns:
    {"per_example": numpy arrays over the real examples, "sums": numpy sums, "count": N,
    "where": [N, 3] int, the (process, batch, row) holding each example (`mesh.take_rows`)}.
  """
  per_example, sums, count, where = [], {}, 0, []
  for i, batch in enumerate(batches):
    preemption.check(interrupt)
    arrays, _ = prepare(batch, mesh)
    out = eval_step(params, arrays, jax.random.fold_in(rng, i))
    gathered = multihost_utils.process_allgather(
        {"x": out["per_example"], "w": arrays["weight"]}, tiled=True)
    keep = np.asarray(gathered["w"]) > 0
    per_example.append({k: np.asarray(v)[keep] for k, v in gathered["x"].items()})
    count += int(keep.sum())
    where.append(_row_holders(mesh, keep.size, i)[keep])
    for k, v in jax.device_get(out["sums"]).items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  return {"per_example": {k: np.concatenate([r[k] for r in per_example])
                          for k in per_example[0]},
          "sums": sums, "count": count, "where": np.concatenate(where)}


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


def summarize(terms: Mapping[str, np.ndarray], dims: Sequence[int], sums: dict | None = None,
              count: int = 0) -> dict[str, float]:
  """Dataset metrics of per-example terms (names of docs/design.md §7 without the split prefix).

  The one summary of every evaluation: the training-time passes (`run_pass`) and
  `--mode=eval` (`Inpainter.evaluate`'s figures) both reduce their examples here.

  Args:
    terms: per-example arrays: recon [N], kl [N, L] and num_dims [N] (nats, as from
      `per_example_elbo`); optionally q_log_sigma and p_log_sigma [N, L] (`run_pass`), and
      iw_log_px and iw_ess [N] (the importance-weighted bound, `Inpainter.evaluate`). Other
      entries are ignored.
    dims: latent dimensions of every level.
    sums: batch sums from `run_pass` (posterior-mean moments) for active units.
    count: number of examples the sums are over.
  """
  num_dims = terms["num_dims"].sum()
  to_bpd = lambda nats: float(objective.bits_per_dim(nats, num_dims))  # noqa: E731
  kl = terms["kl"]  # [N, L]
  metrics = {"bpd": to_bpd(terms["recon"].sum() + kl.sum()),
             "recon_bpd": to_bpd(terms["recon"].sum())}
  if "recon_channels" in terms:  # by channel: they sum to recon_bpd (discrete likelihoods)
    for c, channel in enumerate(CHANNELS):
      metrics[metric_names.name("recon_bpd", channel)] = to_bpd(terms["recon_channels"][:, c].sum())
  for l in range(kl.shape[1]):
    name = functools.partial(metric_names.name, level=l + 1)  # quantity -> QUANTITY/level_l
    metrics[name("kl")] = float(kl[:, l].mean())
    metrics[name("kl_bpd")] = to_bpd(kl[:, l].sum())
    metrics[name("kl_per_dim")] = float(kl[:, l].mean() / dims[l])
    for key, q in QUANTILES.items():
      metrics[name(key)] = float(np.percentile(kl[:, l], q))
    if "q_log_sigma" in terms:
      metrics[name("q_log_sigma")] = float(terms["q_log_sigma"][:, l].mean())
      metrics[name("p_log_sigma")] = float(terms["p_log_sigma"][:, l].mean())
    if sums and count > 1 and f"q_mean/{l + 1}" in sums:
      mean = sums[f"q_mean/{l + 1}"] / count
      var = sums[f"q_mean_sq/{l + 1}"] / count - np.square(mean)
      metrics[name("active_units")] = float(np.mean(var > ACTIVE_UNIT_THRESHOLD))
  if "iw_log_px" in terms:
    metrics["iw_bpd"] = to_bpd(-terms["iw_log_px"].sum())
    metrics["iw_ess"] = float(terms["iw_ess"].mean())
  return metrics


def evaluate_passes(eval_step, params, eval_sets: dict[str, list[dict]], rng, mesh: Mesh,
                    model: HVAE, interrupt=None) -> tuple[dict[str, float], dict[str, dict]]:
  """Runs every pass (e.g. {"eval": ..., "eval_train": ...}) and adds the `gap/` metrics.

  Returns:
    (metrics, passes): docs/design.md §7 names, and each pass's `run_pass` results (for
    diagnostics).
  """
  dims = latent_dims(model.config)
  metrics, passes = {}, {}
  for split, batches in eval_sets.items():
    passes[split] = r = run_pass(eval_step, params, batches, rng, mesh, interrupt)
    m = summarize(r["per_example"], dims, r["sums"], r["count"])
    metrics.update(metric_names.prefixed(split, m))
  if "eval" in eval_sets and "eval_train" in eval_sets:
    metrics.update(metric_names.gaps(metrics, "bpd"))
    metrics.update(metric_names.gaps(metrics, "kl", range(1, len(dims) + 1)))
  return metrics, passes


@functools.lru_cache(maxsize=8)
def make_fill_in_fn(model: HVAE, num_samples: int, pixels: str = "sample",
                    temperature: float | tuple[float, ...] = 1.0):
  """Jitted (params, image, mask, rng) -> [N, B, 64, 64, 3] composited samples."""
  return jax.jit(functools.partial(_fill_ins, model=model, num_samples=num_samples,
                                   pixels=pixels, temperature=temperature))


def _fill_ins(params, image, mask, rng, *, model, num_samples, pixels, temperature):
  return sampling.sample_fill_ins(model, params, image, mask, rng, num_samples=num_samples,
                                  temperature=temperature, pixels=pixels)


@functools.lru_cache(maxsize=4)
def make_mode_fn(model: HVAE):
  """Jitted (params, image, mask) -> [B, 64, 64, 3] mode fill-in."""
  return jax.jit(functools.partial(sampling.mode_fill_in, model))


def fill_in_grid_rows(samples: np.ndarray, image: np.ndarray, mask: np.ndarray,
                      mode: np.ndarray | None = None) -> list:
  """Rows of an image grid, one per example: context | truth | samples ... | mean | [mode]."""
  samples = np.asarray(samples)  # [N, B, 64, 64, 3]
  context = grids.hole_overlay(np.asarray(image), np.asarray(mask))
  mean = np.asarray(sampling.mean_fill_in(jnp.asarray(samples)))
  cols = [context, np.asarray(image)] + list(samples) + [mean]
  if mode is not None:
    cols.append(np.asarray(mode))
  return [np.stack([c[b] for c in cols]) for b in range(image.shape[0])]


FILL_INS = "fill_ins"  # the fill-in grid: images/step_N.png, and TensorBoard's `fill_ins`


def image_filename(name: str, step: int) -> str:
  """The file under WORKDIR/images/ of an evaluation image: step_N.png for the fill-in grid,
  NAME_step_N.png for the diagnostic images (worst, resample, kl_heatmap)."""
  return f"step_{step}.png" if name == FILL_INS else f"{name}_step_{step}.png"


class Evaluator:
  """Everything the training loop does at an evaluation step, on the parameters it is given.

  * The passes over `eval_sets` (held-out `eval/` and training-split `eval_train/`) and `gap/`.
  * The per-level diagnostics of hvae/diagnostics.py (models with latents): `{split}/swap/
    level_l` and `gap/swap/level_l`; every `eval.diagnostics_every`-th evaluation (counted from
    this process's start) also the images `worst`, `resample` and
    `kl_heatmap` (2-D levels only).
  * The fill-in grid of the fixed `grid_batch` (`FILL_INS`): context | truth | samples | mean |
    mode.
  * With `eval.refine_steps` > 0, the encoder/decoder split of the gap (hvae/amortisation.py,
    hvae/memorisation.py): refinement on the first `eval.refine_examples` examples of both
    splits, `{split}/refine/...` and `gap/refine/...`; memorisation on all, `{split}/mi/...`.
  * The overfitting verdict (hvae/verdict.py) over every evaluation so far, those before a
    restart included (`history`): `verdict/overfit/level_l`; a level newly flagged is explained
    once on the console (`logging.warning` when its part of the gap is material, else
    `logging.info`), and `flagged` lists the levels flagged now.

  `evaluator(params, step)` returns (metrics, images) and writes nothing: the metrics by their
  docs/design.md §7 names, `eval/wall_time` included; the images uint8 [H, W, 3] by name (see
  `image_filename`). Every process must call it (the passes are collective).
  """

  def __init__(self, config, model: HVAE, mesh: Mesh, eval_sets: dict[str, list[dict]],
               grid_batch: dict, *, rng, grid_rng, history: Sequence[Mapping] = ()):
    """Compiles nothing yet (the jitted functions compile on first use).

    Args:
      config: the experiment config (its `eval` and `verdict` sections).
      model: the model.
      mesh: the device mesh of the passes.
      eval_sets: split name ("eval", "eval_train") -> host batches (`hvae.data.eval_batches`).
      grid_batch: the fill-in grid's examples, the same on every process.
      rng: key of the passes and the diagnostics (the same at every evaluation).
      grid_rng: key of the fill-in grid's samples.
      history: earlier metrics rows (metrics.jsonl); those with `eval/bpd` feed the verdict.
    """
    e = config.eval
    self.model, self.mesh, self.rng, self.grid_rng = model, mesh, rng, grid_rng
    self.eval_sets, self.grid_batch = eval_sets, grid_batch
    self.num_samples, self.num_worst = int(e.num_samples), int(e.num_worst)
    self.diagnostics_every = e.diagnostics_every
    self.eval_step = make_eval_step(model, mesh)
    # The fill-ins of the grids are drawn as --mode=eval draws them by default.
    pixels, tau = sampling.default_pixels(config), sampling.default_temperature(config)
    self.fill_in = make_fill_in_fn(model, e.num_samples, pixels, tau)
    self.mode_fill_in = make_mode_fn(model)
    self.has_latents = model.config.has_latents
    if self.has_latents:
      self.swap_sets = {k: amortisation.first_batches(v, e.num_swap_examples)
                        for k, v in eval_sets.items()}
      self.swap_step = diagnostics.make_swap_step(model, mesh)
      self.resample = diagnostics.make_resample_fn(model, max(e.num_samples, 4))
      self.fill_one = make_fill_in_fn(model, 1, pixels, tau)
    self.verdict_settings = verdict.settings(config)
    refine = amortisation.settings(config)
    self.split = None  # the encoder/decoder split of the gap (hvae/amortisation.py), if asked
    if self.has_latents and refine.steps > 0:
      self.split = amortisation.Split(model, mesh, eval_sets, rng, refine)
    self.history = [dict(r) for r in history if "eval/bpd" in r]
    self.flagged: list[int] = []  # levels the verdict flags at the latest evaluation
    self._evaluations = 0

  def __call__(self, params, step: int,
               interrupt=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Evaluates `params` (the EMA parameters) at training step `step`.

    `interrupt()` (a stop request; the same answer on every process) is asked before every
    batch of the passes and of the swap pass, before every step of the refinement
    (hvae/amortisation.py) and between the other parts; when it says True the evaluation raises
    `preemption.Interrupted` before anything of it is recorded here.
    """
    t0 = time.perf_counter()
    metrics, passes = evaluate_passes(self.eval_step, params, self.eval_sets, self.rng,
                                      self.mesh, self.model, interrupt)
    pictures = {}
    if self.has_latents:
      preemption.check(interrupt)
      metrics.update(self._swap_metrics(params, interrupt))
      preemption.check(interrupt)
      if self._evaluations % self.diagnostics_every == 0:
        pictures.update(self._diagnostic_images(params, passes))
    preemption.check(interrupt)
    self._evaluations += 1
    pictures[FILL_INS] = self._fill_in_grid(params)
    if self.split is not None:
      metrics.update(self.split(params, interrupt))
    self.history.append({"step": step, **metrics})
    if self.has_latents:
      metrics.update(self._verdict())
    metrics["eval/wall_time"] = time.perf_counter() - t0
    return metrics, pictures

  def _swap_metrics(self, params, interrupt=None) -> dict[str, float]:
    metrics = {}
    for split, batches in self.swap_sets.items():
      m = diagnostics.swap_metrics(self.swap_step, params, batches, self.rng, self.mesh,
                                   interrupt)
      metrics.update(metric_names.prefixed(split, m))
    if "eval" in self.swap_sets and "eval_train" in self.swap_sets:
      levels = range(1, self.model.config.num_levels + 1)
      metrics.update(metric_names.gaps(metrics, "swap", levels))
    return metrics

  def _diagnostic_images(self, params, passes: dict) -> dict[str, np.ndarray]:
    """worst, resample, kl_heatmap (jitted calls on every process)."""
    out = {}
    # Worst examples: the images behind the gathered per-example KLs come from the processes
    # that hold them (`where`), so every process draws the same grid.
    worst = diagnostics.worst_examples(passes["eval"]["per_example"]["kl"],
                                       self.eval_sets["eval"], self.num_worst,
                                       where=passes["eval"]["where"])
    rows = []
    for ex in worst.values():
      fills = self.fill_one(params, jnp.asarray(ex["image"]), jnp.asarray(ex["mask"]),
                            self.rng)[0]
      ctx = grids.hole_overlay(ex["image"], ex["mask"])
      rows.append(np.stack([x for i in range(len(ex["kl"]))
                            for x in (ctx[i], ex["image"][i], np.asarray(fills[i]))]))
    shown = max(len(ex["kl"]) for ex in worst.values())  # fewer when the split is small
    labels = [f"{name} #{i + 1}" for i in range(shown)
              for name in ("context", "truth", "fill-in")]
    out["worst"] = grids.make_grid(rows, labels=labels, scale=2,
                                   row_labels=[f"level {l}" for l in worst])
    grid = {k: v[:2] for k, v in self.grid_batch.items()}
    resampled = jax.device_get(self.resample(params, jnp.asarray(grid["image"]),
                                             jnp.asarray(grid["mask"]), self.rng))
    out["resample"] = diagnostics.resample_grid(resampled, grid["image"], grid["mask"])
    heat = diagnostics.kl_heatmap_grid(
        passes["eval"]["sums"], passes["eval_train"]["sums"], passes["eval"]["count"],
        passes["eval_train"]["count"], self.model.config.num_levels)
    if heat is not None:
      out["kl_heatmap"] = heat
    return out

  def _fill_in_grid(self, params) -> np.ndarray:
    image, mask = self.grid_batch["image"], self.grid_batch["mask"]
    samples = self.fill_in(params, jnp.asarray(image), jnp.asarray(mask), self.grid_rng)
    mode = self.mode_fill_in(params, jnp.asarray(image), jnp.asarray(mask))
    rows = fill_in_grid_rows(jax.device_get(samples), image, mask, jax.device_get(mode))
    labels = (["context", "truth"] + [f"sample {i + 1}" for i in range(self.num_samples)]
              + ["mean", "mode"])
    return grids.make_grid(rows, labels=labels, scale=2)

  def _verdict(self) -> dict[str, float]:
    verdicts = verdict.explain(self.history, self.model.config.num_levels,
                               self.verdict_settings)
    warned = set(self.flagged)
    self.flagged = [v.level for v in verdicts.values() if v.flagged]
    for v in verdicts.values():
      if v.flagged and v.level not in warned:  # the why once; the summary says it after
        # A warning only when the level's part of the gap is material (hvae/verdict.py).
        (logging.warning if v.material else logging.info)(
            "Level %d looks like it overfits: %s", v.level, v.why)
    return {**verdict.verdict_metrics({l: v.flagged for l, v in verdicts.items()}),
            **verdict.part_metrics(verdicts)}
