"""The amortisation split of the held-out gap: how much of it is the encoder's, per level.

Why one file past ~350 lines: the refinement (its objective, the compiled steps over the mesh,
the per-split driver) and the metrics it publishes are one method: the gap's exact split reads
the per-example terms the refinement keeps, and its invariants (S = 0 is the evaluation pass)
tie both halves to the same keys.

The negative ELBO of an example is evaluated at the encoder's posterior. An encoder that fits
training images better than new ones (amortisation overfitting; Zhang, Hayes & Barber 2022)
raises the held-out bound through the reconstruction *and* the KL terms, so the report's
likelihood-vs-KL decomposition cannot tell it from a decoder or prior that generalises badly.
Refining each example's posterior separates them (Cremer, Li & Duvenaud 2018):

* for a fixed set of examples of each split, the posterior parameters of every level are
  offset per example (`posterior_offset` of `hvae.model.ladder.HVAE`: mean and log-scale
  offsets, starting at 0 = the encoder's output) and the offsets optimised for S steps of Adam
  (step size cosine-decayed to 0) on that example's negative ELBO, with the decoder, the prior
  and the encoder's own parameters frozen;
* the objective is the ELBO with the analytic KL, its reconstruction averaged over
  `eval.refine_samples` *fixed* noise draws (default 1); every step's value is tracked and each
  example keeps its best offsets, so refinement never lowers an example's fitted objective
  (`{split}/refine/recovered_bpd_fit` >= 0). Offsets fitted to a few draws flatter themselves
  on those draws (they can shrink sigma_q and move the means to where the draws decode well),
  so every reported figure *scores* the encoder's and the refined posterior on other noise:
  the evaluation pass's own key, so S = 0 is the evaluation pass itself, exactly, and after
  S > 0 steps an example may score worse than before (the optimiser fitted noise it did not
  score). `gap/refine/encoder_bpd_fit` is the encoder part on the fitted noise, for comparison;
* `{split}/refine/recovered_bpd` = bpd before - bpd after refining every level together;
  `{split}/refine/recovered_bpd/level_l` refining level l alone (the others keep the
  encoder's posterior). The per-level parts need not add up to the joint one;
* the gap on these examples, `gap/refine/bpd` = eval - eval_train bpd, splits exactly into
    `gap/refine/encoder_bpd` = recovered on held-out - recovered on training-split examples
      (what a better encoder would win back on new examples and not on training ones), and
    `gap/refine/decoder_bpd` = the gap that remains after refinement (the decoder's and the
      prior's; it still holds whatever S steps did not recover), itself split exactly into
      `gap/refine/decoder_bpd/recon` (the likelihood's) and `gap/refine/decoder_bpd/level_l`
      (level l's KL after refinement: what its prior fails to predict on new examples).
    Per level, `gap/refine/encoder_bpd/level_l` is the same difference for level l refined
    alone.

Nats per image next to every bits/dim figure (`recovered`, `kl_after`, `encoder/level_l`).
For top_down posteriors the offsets shift the encoder's conditional posterior (see the
docstring of `posterior_offset`): refinement searches "encoder + per-example offset", which
contains the encoder, not the free-form family.

Cost: (L + 1) runs of S forward and backward passes per example (all levels, then each level
alone); one compiled step (S, the step index, the level mask and the step size are
arguments), called S times on whole evaluation batches (`eval.batch_size` rows bound the
memory) with the evaluation pass's keys; a stop request (SIGTERM) is honoured between two steps
(`RefineStep`, hvae/preemption.py). Settings: `eval.refine_steps` (0 = off),
`eval.refine_examples`, `eval.refine_lr`, `eval.refine_samples` (each step costs that many
forward and backward passes).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hvae import memorisation, metric_names, objective, preemption
from hvae.errors import ConfigError
from hvae.mesh import prepare, shardings
from hvae.model.distributions import DiagGaussian
from hvae.model.ladder import HVAE

DEFAULT_EXAMPLES = 64
DEFAULT_LR = 0.05
FIT_NOISE = 0x66697400  # fold_in tags of the noise draws the offsets are fitted to


@dataclasses.dataclass(frozen=True)
class Settings:
  """`eval.refine_*`: S (0 = off), examples per split, Adam's peak step size, noise draws of
  the fitted objective."""

  steps: int = 0
  examples: int = DEFAULT_EXAMPLES
  lr: float = DEFAULT_LR
  samples: int = 1


def settings(config, steps: int | None = None) -> Settings:
  """The refinement settings of a config (defaults for keys older configs lack).

  Args:
    config: the experiment config (its `eval` section).
    steps: S, overriding `eval.refine_steps` (`--refine_steps`).
  """
  e = config.get("eval", {}) if config is not None else {}
  s = Settings(steps=int(e.get("refine_steps", 0) if steps is None else steps),
               examples=int(e.get("refine_examples", DEFAULT_EXAMPLES)),
               lr=float(e.get("refine_lr", DEFAULT_LR)),
               samples=int(e.get("refine_samples", 1)))
  if s.steps < 0 or s.examples < 1 or not s.lr > 0 or s.samples < 1:
    raise ConfigError(f"eval.refine_*: need steps >= 0, at least 1 example and 1 sample and a "
                      f"step size > 0, got {s}")
  return s


def _zero_offsets(cfg, batch: int) -> list[DiagGaussian]:
  shapes = [(batch,) + cfg.latent_shape(l) for l in range(1, cfg.num_levels + 1)]
  return [DiagGaussian(jnp.zeros(s, jnp.float32), jnp.zeros(s, jnp.float32)) for s in shapes]


def _objectives(model: HVAE, params, image, mask, rng, samples: int):
  """(terms(offsets, key) -> (nelbo, recon, kl, num_dims), fit_loss(offsets) -> (sum, [B])):
  the scored terms and the fitted objective (`samples` fixed noise draws) of `refine`."""
  fit_keys = [jax.random.fold_in(rng, FIT_NOISE + m) for m in range(samples)]

  def terms(offsets, key):
    out = model.apply({"params": params}, image, mask, posterior_offset=offsets,
                      rngs={"sample": key})
    t = objective.elbo_terms(out, mask)
    return t.recon + jnp.sum(t.kl, axis=-1), t.recon, t.kl, t.num_dims

  def fit_loss(offsets):
    nelbo = sum(terms(offsets, key)[0] for key in fit_keys) / samples  # [B]
    return jnp.sum(nelbo), nelbo  # examples are independent: per-example gradients

  return terms, fit_loss


def _keep_better(best, offsets, nelbo, allowed=True):
  """Each example's best offsets so far (by the fitted objective `nelbo` [B])."""
  better = (nelbo < best["nelbo"]) & allowed  # [B]
  pick = lambda new, old: jnp.where(  # noqa: E731
      better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return {"nelbo": pick(nelbo, best["nelbo"]),
          "offsets": jax.tree_util.tree_map(pick, offsets, best["offsets"])}


def refine_start(model: HVAE, params, image, mask, rng, init=None, samples: int = 1):
  """The state before step 0 of `refine`: (start, carry).

  start: {"nelbo": [B] the fitted objective at the starting offsets, "offsets": those};
  carry: {"offsets", "mu", "nu" (Adam's moments), "best" (as start)}. Every leaf has the batch
  as its first axis (Adam's step count is the step index, `refine_step`'s `i`).
  """
  offsets0 = _zero_offsets(model.config, image.shape[0]) if init is None else init
  _, fit_loss = _objectives(model, params, image, mask, rng, samples)
  start = {"nelbo": fit_loss(offsets0)[1], "offsets": offsets0}
  adam = optax.scale_by_adam().init(offsets0)
  return start, {"offsets": offsets0, "mu": adam.mu, "nu": adam.nu, "best": start}


def refine_step(model: HVAE, params, image, mask, rng, free, i, steps, lr, carry,
                samples: int = 1):
  """Step `i` (0-based, traced) of S = `steps` of `refine`: the carry after it."""
  _, fit_loss = _objectives(model, params, image, mask, rng, samples)
  (_, nelbo), grads = jax.value_and_grad(fit_loss, has_aux=True)(carry["offsets"])
  best = _keep_better(carry["best"], carry["offsets"], nelbo)
  grads = [jax.tree_util.tree_map(lambda g, f=free[l]: g * f, g_l)
           for l, g_l in enumerate(grads)]
  # After i updates Adam's count is i: the state is rebuilt from the step index.
  state = optax.ScaleByAdamState(count=jnp.asarray(i, jnp.int32), mu=carry["mu"],
                                 nu=carry["nu"])
  updates, state = optax.scale_by_adam().update(grads, state)
  steps_f = jnp.maximum(jnp.asarray(steps, jnp.float32), 1.0)
  step_size = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * i / steps_f))
  offsets = jax.tree_util.tree_map(lambda o, u: o - step_size * u, carry["offsets"], updates)
  return {"offsets": offsets, "mu": state.mu, "nu": state.nu, "best": best}


def refine_end(model: HVAE, params, image, mask, rng, steps, start, carry,
               samples: int = 1) -> dict:
  """`refine`'s outputs from the carry after its S = `steps` steps."""
  terms, fit_loss = _objectives(model, params, image, mask, rng, samples)
  done = jnp.asarray(steps) > 0
  best = _keep_better(carry["best"], carry["offsets"], fit_loss(carry["offsets"])[1],
                      allowed=done)
  _, recon0, kl0, num_dims = terms(start["offsets"], rng)
  _, recon1, kl1, _ = terms(best["offsets"], rng)
  return {"recon_before": recon0, "kl_before": kl0, "num_dims": num_dims,
          "recon_after": jnp.where(done, recon1, recon0),  # S = 0: the same arrays, exactly
          "kl_after": jnp.where(done, kl1, kl0),
          "nelbo_fit_before": start["nelbo"], "nelbo_fit_after": best["nelbo"],
          "offsets": best["offsets"]}


def refine(model: HVAE, params, image, mask, rng, free, steps, lr, init=None,
           samples: int = 1) -> dict:
  """Refines every example's posterior offsets; the per-example terms before and after.

  The offsets are fitted to `samples` fixed noise draws (keys fold_in(rng, FIT_NOISE + m)) and
  scored, like the encoder's posterior, on the noise of `rng` itself, which the fit never saw.
  All S steps in one traced loop; `RefineStep` runs the same three parts (`refine_start`,
  S x `refine_step`, `refine_end`) as separate jitted calls, to the same numbers.

  Args:
    model: the model (its likelihood's gradients should be exact: `exact_gradients`).
    params: its parameters (frozen).
    image: [B, 64, 64, 3] pixels in [0, 255].
    mask: [B, 64, 64, 1], 1 = given.
    rng: the `sample` key of the scoring pass (the evaluation pass's: S = 0 reproduces it).
    free: [L] 1.0 for the levels whose offsets are optimised, 0.0 for the others.
    steps: S (a traced integer: one compile for every S).
    lr: Adam's step size at step 0 (cosine-decayed to 0 at step S).
    init: optional starting offsets (default: zeros, the encoder's posterior).
    samples: noise draws the fitted objective averages (static).

  Returns:
    {"recon_before" [B], "kl_before" [B, L], "recon_after" [B], "kl_after" [B, L],
     "num_dims" [B]} in nats, scored on `rng`'s noise at the starting and the best offsets
    (identical for S = 0; after S > 0 steps either may be the larger for an example);
    "nelbo_fit_before", "nelbo_fit_after" [B]: the fitted objective at the starting and the
    best offsets (after <= before, every example); "offsets": the best offsets.
  """
  start, carry = refine_start(model, params, image, mask, rng, init, samples)
  body = lambda i, c: refine_step(model, params, image, mask, rng, free, i, steps, lr, c,  # noqa: E731
                                  samples)
  carry = jax.lax.fori_loop(0, steps, body, carry)
  return refine_end(model, params, image, mask, rng, steps, start, carry, samples)


def exact_gradients(model: HVAE) -> HVAE:
  """The same model (same parameters) with the likelihood's exact gradients: the refinement
  follows the ELBO's own gradient even where training used scaled ones."""
  if model.config.likelihood_grad == "exact":
    return model
  return HVAE(dataclasses.replace(model.config, likelihood_grad="exact",
                                  likelihood_grad_anneal=()))


def _start(params, batch, rng, *, model: HVAE, samples: int):
  return refine_start(model, params, batch["image"], batch["mask"], rng, samples=samples)


def _steps(params, batch, rng, free, first, count, steps, lr, carry, *, model: HVAE,
           samples: int):
  """Steps first .. first + count - 1 of `refine`'s loop (a loop of traced length, like it)."""
  body = lambda i, c: refine_step(model, params, batch["image"], batch["mask"], rng, free, i,  # noqa: E731
                                  steps, lr, c, samples)
  return jax.lax.fori_loop(first, first + count, body, carry)


def _end(params, batch, rng, steps, start, carry, *, model: HVAE, samples: int):
  out = refine_end(model, params, batch["image"], batch["mask"], rng, steps, start, carry,
                   samples)
  out.pop("offsets")
  return out


class RefineStep:
  """(params, batch, rng, free [L], steps, lr, interrupt=None) -> per-example terms (`refine`).

  Three jitted functions, each compiled once whatever S, the level mask and the step size (all
  arguments): `refine_start`, `count` steps from step `first` (both arguments; called S times
  with count 1) and `refine_end`. Between two steps the host asks `interrupt()`
  (`hvae.preemption.check`), so a stop request ends even a long refinement within a step or
  two, and keeps at most one step queued behind the running one (`hvae.preemption.Pacer`).
  The steps run inside a loop of traced length, as in `refine`, so XLA compiles the step as it
  does there: the numbers equal `refine`'s single traced loop bit for bit on CPU
  (tests/test_amortisation.py), where a step jitted on its own differs in the last bit."""

  def __init__(self, model: HVAE, mesh: Mesh, samples: int = 1):
    data, replicated = shardings(mesh)
    model = exact_gradients(model)
    kw = {"model": model, "samples": samples}
    # Every leaf of the carry has the batch as its first axis: split over the devices like it.
    self.start = jax.jit(functools.partial(_start, **kw),
                         in_shardings=(replicated, data, replicated), out_shardings=data)
    self.step = jax.jit(functools.partial(_steps, **kw),
                        in_shardings=(replicated, data) + (replicated,) * 6 + (data,),
                        out_shardings=data)
    self.end = jax.jit(functools.partial(_end, **kw),
                       in_shardings=(replicated, data, replicated, replicated, data, data),
                       out_shardings=data)
    self._first_step_logged = False

  def __call__(self, params, batch, rng, free, steps, lr, interrupt=None) -> dict:
    start, carry = self.start(params, batch, rng)
    pace = preemption.Pacer(interrupt)
    t0 = time.perf_counter()
    for i in range(int(steps)):
      preemption.check(interrupt)
      carry = pace(self.step(params, batch, rng, free, np.int32(i), np.int32(1), steps, lr,
                             carry))
      if not self._first_step_logged:  # compiled and run: later steps only run
        jax.block_until_ready(carry)
        self._first_step_logged = True
        logging.info("refine: step 1 of %d ran (%.1f s, compilation included); a stop request "
                     "is honoured between steps", int(steps), time.perf_counter() - t0)
    preemption.check(interrupt)
    return self.end(params, batch, rng, steps, start, carry)

  def cache_sizes(self) -> tuple[int, int, int]:
    """How often the start, the step and the end were compiled (1 each once called)."""
    return tuple(f._cache_size() for f in (self.start, self.step, self.end))  # noqa: SLF001


@functools.lru_cache(maxsize=4)
def make_refine_step(model: HVAE, mesh: Mesh, samples: int = 1) -> RefineStep:
  """The refinement of a batch (`RefineStep`), built once per (model, mesh, samples)."""
  return RefineStep(model, mesh, samples)


def gather(step, batches: list[dict], rng, mesh: Mesh, interrupt=None) -> dict[str, np.ndarray]:
  """Runs step(arrays, key_i) over `batches` with key_i = fold_in(rng, i) (the keys of the
  evaluation pass, `hvae.evaluation.run_pass`) and gathers its per-example outputs on the host,
  padding rows dropped. `interrupt()`, if given, is asked before every batch."""
  rows = []
  for i, batch in enumerate(batches):
    preemption.check(interrupt)
    arrays, _ = prepare(batch, mesh)
    out = step(arrays, jax.random.fold_in(rng, i))
    g = multihost_utils.process_allgather({"x": out, "w": arrays["weight"]}, tiled=True)
    keep = np.asarray(g["w"]) > 0
    rows.append({k: np.asarray(v)[keep] for k, v in g["x"].items()})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def refine_split(refine_step, params, batches: list[dict], rng, mesh: Mesh, s: Settings,
                 num_levels: int, interrupt=None) -> dict[str, np.ndarray]:
  """Refines every level together, then each level alone, over one split's batches;
  `interrupt()`, if given, is asked before every step (`RefineStep`).

  Returns:
    numpy per-example terms (nats): recon_before [N], kl_before [N, L], recon_after [N],
    kl_after [N, L] (all levels refined), nelbo_alone [N, L] (level l alone), num_dims [N],
    scored on the evaluation noise; nelbo_fit_before, nelbo_fit_after [N]: the fitted objective.
  """
  steps, lr = jnp.int32(s.steps), jnp.float32(s.lr)
  run = lambda free: gather(  # noqa: E731
      lambda arrays, key: refine_step(params, arrays, key, free, steps, lr, interrupt), batches,
      rng, mesh, interrupt)
  out = run(jnp.ones((num_levels,), jnp.float32))
  alone = []
  for l in range(num_levels):
    r = run(jnp.asarray(np.eye(num_levels, dtype=np.float32)[l]))
    alone.append(r["recon_after"] + r["kl_after"].sum(-1))
  out["nelbo_alone"] = np.stack(alone, axis=-1)
  return out


def split_metrics(terms: Mapping[str, np.ndarray]) -> dict[str, float]:
  """The figures of one split (names without the split prefix), from `refine_split`'s terms."""
  terms = {k: np.asarray(v, np.float64) for k, v in terms.items()}  # parts add up exactly
  num_dims = float(np.sum(terms["num_dims"]))
  bpd = lambda nats: float(objective.bits_per_dim(float(np.sum(nats)), num_dims))  # noqa: E731
  before = terms["recon_before"] + terms["kl_before"].sum(-1)
  after = terms["recon_after"] + terms["kl_after"].sum(-1)
  m = {"refine/bpd_before": bpd(before), "refine/bpd_after": bpd(after),
       "refine/recovered_bpd": bpd(before - after),
       "refine/recovered": float(np.mean(before - after)),
       "refine/recon_bpd_after": bpd(terms["recon_after"]),
       "refine/recovered_bpd_fit": bpd(terms["nelbo_fit_before"] - terms["nelbo_fit_after"])}
  for l in range(terms["kl_after"].shape[1]):
    name = f"level_{l + 1}"
    gain = before - terms["nelbo_alone"][:, l]
    m[f"refine/recovered/{name}"] = float(np.mean(gain))
    m[f"refine/recovered_bpd/{name}"] = bpd(gain)
    m[f"refine/kl_after/{name}"] = float(np.mean(terms["kl_after"][:, l]))
    m[f"refine/kl_bpd_after/{name}"] = bpd(terms["kl_after"][:, l])
  return m


def gap_metrics(metrics: Mapping[str, float], num_levels: int, held: str = "eval",
                train: str = "eval_train") -> dict[str, float]:
  """`gap/refine/...`: the held-out gap on the refined examples split into the encoder's and
  the decoder's/prior's parts (module docstring), from both splits' `split_metrics`."""
  d = lambda name: metrics[f"{held}/{name}"] - metrics[f"{train}/{name}"]  # noqa: E731
  m = {"gap/refine/bpd": d("refine/bpd_before"),
       "gap/refine/encoder_bpd": d("refine/recovered_bpd"),
       "gap/refine/decoder_bpd": d("refine/bpd_after"),
       "gap/refine/decoder_bpd/recon": d("refine/recon_bpd_after"),
       "gap/refine/encoder_bpd_fit": d("refine/recovered_bpd_fit")}
  for l in range(1, num_levels + 1):
    m[f"gap/refine/encoder_bpd/level_{l}"] = d(f"refine/recovered_bpd/level_{l}")
    m[f"gap/refine/encoder/level_{l}"] = d(f"refine/recovered/level_{l}")
    m[f"gap/refine/decoder_bpd/level_{l}"] = d(f"refine/kl_bpd_after/level_{l}")
  return m


class Split:
  """The encoder/decoder split of an evaluation: refinement and memorisation, both splits.

  `split(params)` returns `{split}/refine/...`, `{split}/mi/...` and `gap/refine/...` metrics
  (collective: every process calls it). Built by the training loop's evaluator when
  `eval.refine_steps` > 0, and by `--mode=eval --refine_steps=S`.
  """

  def __init__(self, model: HVAE, mesh: Mesh, eval_sets: dict[str, list[dict]], rng,
               s: Settings):
    """Compiles nothing yet.

    Args:
      model: the model.
      mesh: the device mesh.
      eval_sets: split prefix ("eval", "eval_train") -> the evaluation pass's host batches:
        the memorisation estimate uses all of them, the refinement the first whole batches
        holding `s.examples` examples (with the pass's keys, so S = 0 is the pass itself).
      rng: the evaluation pass's key.
      s: the settings.
    """
    self.model, self.mesh, self.eval_sets, self.rng, self.settings = model, mesh, eval_sets, \
        rng, s
    self.refine_sets = {k: first_batches(v, s.examples) for k, v in eval_sets.items()}
    self.refine_step = make_refine_step(model, mesh, s.samples)
    self.posterior_step = memorisation.make_posterior_step(model, mesh)

  def __call__(self, params, interrupt=None) -> dict[str, float]:
    """The metrics; `interrupt()`, if given, is asked before every refinement step and every
    batch (`hvae.preemption.Interrupted` when it says True)."""
    L = self.model.config.num_levels
    metrics = {}
    for split, batches in self.eval_sets.items():
      terms = refine_split(self.refine_step, params, self.refine_sets[split], self.rng,
                           self.mesh, self.settings, L, interrupt)
      metrics.update(metric_names.prefixed(split, split_metrics(terms)))
      posteriors = gather(lambda arrays, key: self.posterior_step(params, arrays, key),
                          batches, self.rng, self.mesh, interrupt)
      mi = memorisation.split_metrics(posteriors, L)
      metrics.update(metric_names.prefixed(split, mi))
    if "eval" in self.eval_sets and "eval_train" in self.eval_sets:
      metrics.update(gap_metrics(metrics, L))
    return metrics


def first_batches(batches: list[dict], n: int) -> list[dict]:
  """The first whole batches holding at least `n` real examples (padding rows, weight 0, do not
  count; whole batches, so shapes stay the same): the refinement's and the swap pass's sets."""
  out, count = [], 0
  for b in batches:
    if count >= n:
      break
    out.append(b)
    count += int(np.sum(b.get("weight", np.ones(b["image"].shape[0]))))
  return out


def evaluation_key(config) -> jax.Array:
  """The key of the training loop's evaluation passes (`hvae.loop`: the third of four keys split
  from PRNGKey(seed)), so `--mode=eval` refines with the noise the training evaluations used."""
  return jax.random.split(jax.random.PRNGKey(int(config.seed)), 4)[2]

