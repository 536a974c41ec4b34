"""The importance-weighted bound on log p(x_inner | x_outer) and its effective sample size.

With z_k ~ q(z | x) (k = 1..K, every level from the posterior) and

  log w_k = log p(x_inner | z_k, x_outer) + sum_l [log p(z_l,k | z_>l,k, x_outer)
                                                   - log q(z_l,k | ...)],

the bound is IW_K = log (1/K) sum_k w_k <= log p(x_inner | x_outer) (Burda et al. 2016). It
equals the single-sample ELBO with a Monte-Carlo KL for K = 1, does not decrease in
expectation as K grows, and tends to log p(x_inner | x_outer) as K -> infinity. The
reconstruction part sums `log_px` over the missing pixels only, as the ELBO does.

The K samples run in batched form: one jitted function draws `chunk` samples at once by tiling
the batch (rows sample-major, [chunk * B]); a Python loop calls that single compiled function
ceil(K / chunk) times with keys fold_in(rng, i), so memory is bounded by `chunk` and K never
triggers a recompile. Samples of the last chunk beyond K are dropped.

The trunk's features (h^p of the context and h^q of the whole image) depend on (image, mask)
only, not on z: they are computed once per batch and tiled, and only the top-down path (priors,
posteriors, decoder blocks, output head and likelihood) runs once per sample. One pass records
the trunk's outputs (flax's `capture_intermediates`) and the sampled passes take them tiled
(`HVAE(..., features=)`), so the log weights are those of K full forward passes with the same
noise, bit for bit on CPU (tests/test_iw.py), at a fraction of their cost
(`benchmarks/eval_cost.py` prints it in units of one forward pass).

The effective sample size of the normalised weights, ESS = (sum_k w_k)^2 / sum_k w_k^2, is in
[1, K]: near K when q matches the true posterior, near 1 when one sample dominates (then the
bound is little better than the ELBO, and the K-sample estimate of log p is unreliable).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hvae import preemption
from hvae.model.ladder import HVAE, POSTERIOR, split_trunk
from hvae.model.trunk import Trunk

DEFAULT_MAX_ROWS = 256  # forward-pass rows (samples x examples) per chunk, bounds memory


def _features(params, image, mask, *, model: HVAE) -> tuple:
  """(h^p, h^q): the trunk's outputs in one posterior forward pass (one call on a_q and a_p
  stacked along the batch, `HVAE.__call__`), split back into the two inputs'.

  Everything else the pass computes is unused, and XLA drops it.
  """
  _, state = model.apply(
      {"params": params}, image, mask, sources=POSTERIOR, compute_posterior=True,
      rngs={"sample": jax.random.PRNGKey(0)}, mutable=["intermediates"],
      capture_intermediates=lambda module, method: (
          isinstance(module, Trunk) and method == "__call__"))
  (both,) = state["intermediates"]["trunk"]["__call__"]
  return split_trunk(both, image.shape[0])


@functools.lru_cache(maxsize=32)
def make_features_fn(model: HVAE):
  """Jitted (params, image, mask) -> the trunk outputs the sampled passes reuse (`_features`)."""
  return jax.jit(functools.partial(_features, model=model))


def _log_weights(params, image, mask, rng, features=None, *, model: HVAE, chunk: int,
                 share_trunk: bool = True) -> jnp.ndarray:
  """[chunk, B] log importance weights (nats) of `chunk` posterior samples per example."""
  batch = image.shape[0]
  tile = lambda x: jnp.tile(jnp.asarray(x), (chunk,) + (1,) * (x.ndim - 1))  # noqa: E731
  if share_trunk:
    if features is None:
      features = _features(params, image, mask, model=model)
    features = jax.tree_util.tree_map(tile, features)  # rows sample-major, as the tiled inputs
  else:
    features = None
  out = model.apply({"params": params}, tile(image), tile(mask), sources=POSTERIOR,
                    compute_posterior=True, features=features, rngs={"sample": rng})
  missing = 1.0 - jnp.asarray(tile(mask), jnp.float32)[..., 0]
  log_w = jnp.sum(out.log_px * missing, axis=(1, 2))  # [chunk * B]
  for lev in out.levels:
    log_w = log_w + lev.log_p - lev.log_q
  return log_w.reshape(chunk, batch)


def make_log_weights_fn(model: HVAE, chunk: int, share_trunk: bool = True):
  """Jitted (params, image, mask, rng[, features]) -> [chunk, B] log weights.

  One compile per (model, chunk) and per whether `features` is given.

  Args:
    model: the model (hashable; a flax module with a frozen config).
    chunk: posterior samples drawn per call.
    share_trunk: run the trunk once per example and tile its features (the default), with
      `features` from `make_features_fn` or, when not given, computed in the call; False: K
      full forward passes (the implementation before the trunk was shared, the reference of
      the tests and of `benchmarks/eval_cost.py`), `features` ignored.

  Returns:
    The jitted function. Inputs: image [B, 64, 64, 3] in [0, 255], mask [B, 64, 64, 1].
  """
  return _log_weights_fn(model, chunk, bool(share_trunk))


@functools.lru_cache(maxsize=32)
def _log_weights_fn(model: HVAE, chunk: int, share_trunk: bool):
  """`make_log_weights_fn`'s cache: one jitted function per (model, chunk, share_trunk)."""
  return jax.jit(functools.partial(_log_weights, model=model, chunk=chunk,
                                   share_trunk=share_trunk))


def chunk_size(num_samples: int, batch: int, max_rows: int = DEFAULT_MAX_ROWS) -> int:
  """Samples per chunk: as many as fit in `max_rows` rows, at least 1, at most `num_samples`."""
  return int(max(1, min(num_samples, max_rows // max(batch, 1))))


def log_weights(model: HVAE, params, image, mask, rng, num_samples: int, *,
                chunk: int | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                share_trunk: bool = True, interrupt=None) -> np.ndarray:
  """Draws K = `num_samples` log importance weights per example.

  Args:
    model: the model.
    params: its parameters.
    image: [B, 64, 64, 3] pixels in [0, 255] (the missing pixels are the ones scored).
    mask: [B, 64, 64, 1], 1 = given.
    rng: PRNG key; chunk i uses fold_in(rng, i).
    num_samples: K >= 1.
    chunk: samples per compiled call (default: as many as fit in `max_rows` rows).
    max_rows: bound on chunk * B when `chunk` is not given.
    share_trunk: the trunk once per batch (default), or K full forward passes (the reference;
      `make_log_weights_fn`). The same weights either way.
    interrupt: asked before every chunk (`hvae.preemption.check`: `Interrupted` when it says
      True); with it, at most one chunk is queued behind the running one.

  Returns:
    float64 numpy [K, B], nats.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples (K) must be >= 1, got {num_samples}")
  chunk = chunk or chunk_size(num_samples, image.shape[0], max_rows)
  fn = make_log_weights_fn(model, chunk, share_trunk)
  features = make_features_fn(model)(params, image, mask) if share_trunk else None
  pace, parts = preemption.Pacer(interrupt), []
  for i in range(math.ceil(num_samples / chunk)):
    preemption.check(interrupt)
    parts.append(pace(fn(params, image, mask, jax.random.fold_in(rng, i), features)))
  # One host transfer at the end: without `interrupt` the loop only enqueues work.
  return np.concatenate([np.asarray(p, np.float64) for p in jax.device_get(parts)])[:num_samples]


def logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
  """float64 log-sum-exp on the host (jax's would drop to float32 without x64 enabled)."""
  x = np.asarray(x, np.float64)
  top = np.max(x, axis=axis, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def iw_bound(log_w: np.ndarray) -> np.ndarray:
  """IW_K = logsumexp_k(log w_k) - log K, per example. log_w: [K, B] -> [B] nats."""
  log_w = np.asarray(log_w, np.float64)
  return np.asarray(logsumexp(log_w, axis=0)) - math.log(log_w.shape[0])


def effective_sample_size(log_w: np.ndarray) -> np.ndarray:
  """ESS = (sum w)^2 / sum w^2 per example, in [1, K]. log_w: [K, B] -> [B]."""
  log_w = np.asarray(log_w, np.float64)
  return np.exp(2.0 * np.asarray(logsumexp(log_w, axis=0))
                - np.asarray(logsumexp(2.0 * log_w, axis=0)))


def estimate(model: HVAE, params, image, mask, rng, num_samples: int, **kwargs) -> dict:
  """The IW bound and ESS of a batch.

  Args:
    model, params, image, mask, rng, num_samples: as for `log_weights`.
    **kwargs: `chunk` / `max_rows` / `share_trunk` / `interrupt`, passed on.

  Returns:
    {"log_px": [B] IW_K in nats (a lower bound on log p(x_inner | x_outer)),
     "ess": [B] effective sample size, "log_w": [K, B]}; numpy float64.
  """
  log_w = log_weights(model, params, image, mask, rng, num_samples, **kwargs)
  return {"log_px": iw_bound(log_w), "ess": effective_sample_size(log_w), "log_w": log_w}
