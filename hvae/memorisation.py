"""Per-example memorisation per level: the "ELBO surgery" split of the average KL.

Over an evaluation set of N examples x_n (n uniform on 1..N), the average KL of level l splits
(Hoffman & Johnson 2016, "ELBO surgery") into

  (1/N) sum_n KL(q_n(z_l) || p_n(z_l)) = I(n; z_l) + [average KL - I(n; z_l)],

  I(n; z_l) = E_n E_{q_n}[log q_n(z_l) - log qbar(z_l)],  qbar = (1/N) sum_m q_m,

the mutual information between the example's index and its latent under the aggregate
posterior qbar, and the rest, `marginal_kl`, which for an unconditional prior is
KL(qbar || p) and here (the prior depends on x_outer and z_>l) is the average of
E_{q_n}[log qbar - log p_n]. Because log q_n <= log (N qbar), **I(n; z_l) <= log N**: a level
whose I approaches log N tells every example apart from every other one; one that does so on
the training split only (held-out I well below) has memorised its training examples. The
report shows log N (`{split}/mi_max`) next to I.

Estimate: one posterior pass with the evaluation pass's keys gives every example's Gaussian
q_n(z_l) (for top_down posteriors, conditioned on the z_>l sampled in that pass, so qbar is
the mixture of those conditionals); `num_samples` draws z ~ q_n per example are scored under
all N components on the host in float64 (a [N, N] matrix of log-densities per draw, by
matrix products), and I is their Monte-Carlo average. The bound I <= log N holds for every
draw, so it holds for the estimate. The average KL is the analytic one of the same pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from hvae import metric_names, objective
from hvae.mesh import shardings
from hvae.model.ladder import HVAE

DEFAULT_SAMPLES = 8  # draws z ~ q_n per example


def _posterior_step(params, batch, rng, *, model: HVAE):
  """Per example: every level's posterior mean and log-scale [B, D_l] and KL [B, L]."""
  out = model.apply({"params": params}, batch["image"], batch["mask"], rngs={"sample": rng})
  flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
  per_example = {"kl": objective.elbo_terms(out, batch["mask"]).kl}
  for l, lev in enumerate(out.levels, start=1):
    per_example[f"mean/{l}"] = flat(lev.q.mean)
    per_example[f"log_scale/{l}"] = flat(lev.q.log_scale)
  return per_example


@functools.lru_cache(maxsize=4)
def make_posterior_step(model: HVAE, mesh: Mesh):
  """Jits (params, batch, rng) -> per-example posterior parameters and KL (`_posterior_step`)."""
  data, replicated = shardings(mesh)
  return jax.jit(functools.partial(_posterior_step, model=model),
                 in_shardings=(replicated, data, replicated), out_shardings=data)


def log_density_matrix(z: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
  """[N, M]: log N(z_n; mean_m, diag(exp(log_scale_m))^2), summed over the D dimensions.

  Args:
    z: [N, D] points; mean, log_scale: [M, D] the components.

  Returns:
    float64 [N, M] nats, by matrix products (float64 keeps the cancellation harmless).
  """
  z, mean, log_scale = (np.asarray(a, np.float64) for a in (z, mean, log_scale))
  w = np.exp(-2.0 * log_scale)  # [M, D] precisions
  quad = (z**2) @ w.T - 2.0 * z @ (mean * w).T + np.sum(mean**2 * w, axis=1)  # [N, M]
  return -0.5 * quad - np.sum(log_scale, axis=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def mutual_information(mean: np.ndarray, log_scale: np.ndarray, num_samples: int = DEFAULT_SAMPLES,
                       seed: int = 0) -> float:
  """I(n; z) of the uniform mixture of N diagonal Gaussians, Monte Carlo; in [0, log N].

  Args:
    mean, log_scale: [N, D] the posteriors q_n.
    num_samples: draws z ~ q_n per example.
    seed: the host generator's seed (the estimate is deterministic given it).

  Returns:
    The estimate, nats.
  """
  mean, log_scale = np.asarray(mean, np.float64), np.asarray(log_scale, np.float64)
  n = mean.shape[0]
  rs = np.random.RandomState(seed)
  total = 0.0
  for _ in range(num_samples):
    z = mean + np.exp(log_scale) * rs.standard_normal(mean.shape)
    logq = log_density_matrix(z, mean, log_scale)  # [N, N]; row n: z_n under every q_m
    top = logq.max(axis=1, keepdims=True)
    log_mix = np.log(np.mean(np.exp(logq - top), axis=1)) + top[:, 0]
    total += float(np.mean(np.diag(logq) - log_mix))
  return min(total / num_samples, math.log(n))  # the bound holds per draw; min: rounding


def split_metrics(per_example: Mapping[str, np.ndarray], num_levels: int,
                  num_samples: int = DEFAULT_SAMPLES) -> dict[str, float]:
  """`mi/level_l`, `marginal_kl/level_l` (nats per image) and `mi_max` = log N of one split.

  Args:
    per_example: the gathered outputs of `make_posterior_step` over the split's examples.
    num_levels: L.
    num_samples: draws per example.
  """
  n = per_example["kl"].shape[0]
  m = {"mi_max": math.log(max(n, 1))}
  for l in range(1, num_levels + 1):
    mi = mutual_information(per_example[f"mean/{l}"], per_example[f"log_scale/{l}"],
                            num_samples, seed=l)
    m[metric_names.name("mi", level=l)] = mi
    m[metric_names.name("marginal_kl", level=l)] = float(np.mean(per_example["kl"][:, l - 1])) - mi
  return m
