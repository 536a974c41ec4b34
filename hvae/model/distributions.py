"""Diagonal Gaussians: reparameterised samples, log-densities and the analytic KL.

Everything is elementwise (same shape as the latent); callers sum over the axes they need, so
a 2-D level can report its KL per position and per channel as well as per image.
"""

from __future__ import annotations

import math

import flax
import jax.numpy as jnp

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def soft_clamp(x: jnp.ndarray, c: float) -> jnp.ndarray:
  """c * tanh(x / c): ~x for |x| << c, always inside (-c, c), its gradient -> 0 at the bounds
  (NVAE's soft clamp); c = 0 returns x unchanged."""
  return c * jnp.tanh(x / c) if c > 0 else x


@flax.struct.dataclass
class DiagGaussian:
  """N(mean, scale^2 I), stored with its log-scale for accurate KLs.

  Attributes:
    mean: [B, ...] means.
    log_scale: [B, ...] log standard deviations (same shape).
  """

  mean: jnp.ndarray
  log_scale: jnp.ndarray

  @classmethod
  def standard(cls, shape, dtype=jnp.float32) -> DiagGaussian:
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def scale(self) -> jnp.ndarray:
    return jnp.exp(self.log_scale)

  def sample(self, eps: jnp.ndarray, temperature=1.0) -> jnp.ndarray:
    """Reparameterised sample `mean + temperature * scale * eps` for standard-normal `eps`."""
    return self.mean + temperature * self.scale * eps

  def log_prob(self, z: jnp.ndarray) -> jnp.ndarray:
    """Elementwise log N(z; mean, scale^2), nats."""
    u = (z - self.mean) * jnp.exp(-self.log_scale)
    return -0.5 * jnp.square(u) - self.log_scale - _HALF_LOG_2PI

  def kl(self, other: DiagGaussian) -> jnp.ndarray:
    """Elementwise analytic KL(self || other), nats; exactly 0 for identical distributions."""
    ratio_sq = jnp.exp(2.0 * (self.log_scale - other.log_scale))
    mean_term = jnp.square((self.mean - other.mean) * jnp.exp(-other.log_scale))
    return 0.5 * (mean_term + ratio_sq - 1.0) + (other.log_scale - self.log_scale)
