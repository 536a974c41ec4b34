"""The amortisation split of the held-out gap: how much of it is the encoder's, per level.

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
alone); one compiled function (S, the level mask and the step size are arguments), called on
whole evaluation batches (`eval.batch_size` rows bound the memory) with the evaluation pass's
keys. Settings: `eval.refine_steps` (0 = off), `eval.refine_examples`, `eval.refine_lr`,
`eval.refine_samples` (each step costs that many forward and backward passes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hvae import memorisation, objective
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


def refine(model: HVAE, params, image, mask, rng, free, steps, lr, init=None,
           samples: int = 1) -> dict:
  """Refines every example's posterior offsets; the per-example terms before and after.

  The offsets are fitted to `samples` fixed noise draws (keys fold_in(rng, FIT_NOISE + m)) and
  scored, like the encoder's posterior, on the noise of `rng` itself, which the fit never saw.

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
  batch = image.shape[0]
  offsets0 = _zero_offsets(model.config, batch) if init is None else init
  fit_keys = [jax.random.fold_in(rng, FIT_NOISE + m) for m in range(samples)]

  def terms(offsets, key):
    out = model.apply({"params": params}, image, mask, posterior_offset=offsets,
                      rngs={"sample": key})
    t = objective.elbo_terms(out, mask)
    return t.recon + jnp.sum(t.kl, axis=-1), t.recon, t.kl, t.num_dims

  def fit_loss(offsets):
    nelbo = sum(terms(offsets, key)[0] for key in fit_keys) / samples  # [B]
    return jnp.sum(nelbo), nelbo  # examples are independent: per-example gradients

  value_and_grad = jax.value_and_grad(fit_loss, has_aux=True)
  adam = optax.scale_by_adam()

  def keep_better(best, offsets, nelbo, allowed=True):
    better = (nelbo < best["nelbo"]) & allowed  # [B]
    pick = lambda new, old: jnp.where(  # noqa: E731
        better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return {"nelbo": pick(nelbo, best["nelbo"]),
            "offsets": jax.tree_util.tree_map(pick, offsets, best["offsets"])}

  fit_before = fit_loss(offsets0)[1]
  steps_f = jnp.maximum(jnp.asarray(steps, jnp.float32), 1.0)

  def body(i, carry):
    offsets, opt_state, best = carry
    (_, nelbo), grads = value_and_grad(offsets)
    best = keep_better(best, offsets, nelbo)
    grads = [jax.tree_util.tree_map(lambda g, f=free[l]: g * f, g_l)
             for l, g_l in enumerate(grads)]
    updates, opt_state = adam.update(grads, opt_state)
    step_size = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * i / steps_f))
    offsets = jax.tree_util.tree_map(lambda o, u: o - step_size * u, offsets, updates)
    return offsets, opt_state, best

  start = {"nelbo": fit_before, "offsets": offsets0}
  offsets, _, best = jax.lax.fori_loop(0, steps, body, (offsets0, adam.init(offsets0), start))
  done = jnp.asarray(steps) > 0
  best = keep_better(best, offsets, fit_loss(offsets)[1], allowed=done)
  _, recon0, kl0, num_dims = terms(offsets0, rng)
  _, recon1, kl1, _ = terms(best["offsets"], rng)
  return {"recon_before": recon0, "kl_before": kl0, "num_dims": num_dims,
          "recon_after": jnp.where(done, recon1, recon0),  # S = 0: the same arrays, exactly
          "kl_after": jnp.where(done, kl1, kl0),
          "nelbo_fit_before": fit_before, "nelbo_fit_after": best["nelbo"],
          "offsets": best["offsets"]}


def _refine_step(params, batch, rng, free, steps, lr, *, model: HVAE, samples: int):
  out = refine(model, params, batch["image"], batch["mask"], rng, free, steps, lr,
               samples=samples)
  out.pop("offsets")
  return out


def exact_gradients(model: HVAE) -> HVAE:
  """The same model (same parameters) with the likelihood's exact gradients: the refinement
  follows the ELBO's own gradient even where training used scaled ones."""
  if model.config.likelihood_grad == "exact":
    return model
  return HVAE(dataclasses.replace(model.config, likelihood_grad="exact",
                                  likelihood_grad_anneal=()))


@functools.lru_cache(maxsize=4)
def make_refine_step(model: HVAE, mesh: Mesh, samples: int = 1):
  """Jits (params, batch, rng, free [L], steps, lr) -> per-example terms (`refine`), once."""
  data, replicated = shardings(mesh)
  return jax.jit(functools.partial(_refine_step, model=exact_gradients(model), samples=samples),
                 in_shardings=(replicated, data, replicated, replicated, replicated, replicated),
                 out_shardings=data)


def gather(step, batches: list[dict], rng, mesh: Mesh) -> dict[str, np.ndarray]:
  """Runs step(arrays, key_i) over `batches` with key_i = fold_in(rng, i) (the keys of the
  evaluation pass, `hvae.evaluation.run_pass`) and gathers its per-example outputs on the host,
  padding rows dropped."""
  rows = []
  for i, batch in enumerate(batches):
    arrays, _ = prepare(batch, mesh)
    out = step(arrays, jax.random.fold_in(rng, i))
    g = multihost_utils.process_allgather({"x": out, "w": arrays["weight"]}, tiled=True)
    keep = np.asarray(g["w"]) > 0
    rows.append({k: np.asarray(v)[keep] for k, v in g["x"].items()})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def refine_split(refine_step, params, batches: list[dict], rng, mesh: Mesh, s: Settings,
                 num_levels: int) -> dict[str, np.ndarray]:
  """Refines every level together, then each level alone, over one split's batches.

  Returns:
    numpy per-example terms (nats): recon_before [N], kl_before [N, L], recon_after [N],
    kl_after [N, L] (all levels refined), nelbo_alone [N, L] (level l alone), num_dims [N],
    scored on the evaluation noise; nelbo_fit_before, nelbo_fit_after [N]: the fitted objective.
  """
  steps, lr = jnp.int32(s.steps), jnp.float32(s.lr)
  run = lambda free: gather(  # noqa: E731
      lambda arrays, key: refine_step(params, arrays, key, free, steps, lr), batches, rng, mesh)
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

  def __call__(self, params) -> dict[str, float]:
    L = self.model.config.num_levels
    metrics = {}
    for split, batches in self.eval_sets.items():
      terms = refine_split(self.refine_step, params, self.refine_sets[split], self.rng,
                           self.mesh, self.settings, L)
      metrics.update({f"{split}/{k}": v for k, v in split_metrics(terms).items()})
      posteriors = gather(lambda arrays, key: self.posterior_step(params, arrays, key),
                          batches, self.rng, self.mesh)
      mi = memorisation.split_metrics(posteriors, L)
      metrics.update({f"{split}/{k}": v for k, v in mi.items()})
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

