"""Training: the train state, the optimiser, and the jitted data-parallel train step.

`train_step(state, batch, rng, *, ...) -> (state, metrics)` is a pure module-level function;
`make_train_step` binds its static arguments and jits it once over a device `Mesh` of
`hvae.mesh` (batch split over the `data` axis, everything else replicated, the state donated).
The same code runs on one CPU, 8 GPUs or a TPU slice; there is no pmap. The loop that drives it
is `hvae.loop`. The loss itself is assembled in `hvae.objective.loss`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from hvae import metric_names, objective, remedies
from hvae.mesh import shardings
from hvae.model import ladder, likelihoods
from hvae.model.ladder import HVAE
from hvae.typed_config import ConfigError, LossConfig, ModelConfig


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; all of it is checkpointed."""

  step: jnp.ndarray  # [] int32, number of steps taken (skipped ones included)
  params: Any
  ema_params: Any
  opt_state: Any
  consecutive_skips: jnp.ndarray  # [] int32, skipped updates in a row so far
  total_skips: jnp.ndarray  # [] int32


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to `optim.learning_rate`, then constant or cosine decay to 0.

  The cosine reaches 0 at `optim.schedule_steps`, or at `train.num_steps` when that is 0 (or
  absent, in configs written before it existed): so raising `train.num_steps` of a finished run
  changes its learning-rate history, unless `optim.schedule_steps` keeps the old length.
  """
  o = config.optim
  steps = int(o.get("schedule_steps", 0) or 0) or config.train.num_steps
  if steps < 0:
    raise ConfigError(f"optim.schedule_steps: must be >= 0 (0 = train.num_steps), got {steps}")
  warmup = max(int(o.warmup_steps), 0)
  schedules = {
      "constant": lambda: optax.constant_schedule(o.learning_rate),
      "cosine": lambda: optax.cosine_decay_schedule(o.learning_rate, max(steps - warmup, 1)),
  }
  if o.schedule not in schedules:
    raise ConfigError(f"optim.schedule: {o.schedule!r} is not one of {', '.join(schedules)}")
  after = schedules[o.schedule]()
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after],
                              [warmup])


_OPTIMIZERS = {
    "adam": lambda lr, wd, b1, b2: optax.adam(lr, b1=b1, b2=b2),
    "adamw": lambda lr, wd, b1, b2: optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd),
    "adamax": lambda lr, wd, b1, b2: optax.adamax(lr, b1=b1, b2=b2),
}


def create_optimizer(config) -> optax.GradientTransformation:
  """The optimiser of `config.optim` (clipping is part of it; skipping is in the step).

  `optim.b1`, `optim.b2` are the decay rates of the first and second moments (optax's defaults,
  0.9 and 0.999, when a config written before they existed lacks them). A small b2 (VDVAE's 0.9)
  lets the second moment follow gradients whose size changes quickly, such as the location
  gradients during `model.likelihood_grad_anneal`: with b2 = 0.999 it lags ~1000 steps behind
  and updates grow to several times the learning rate (`tests/test_train.py`); docs/results.md,
  "The anneal's spikes", has what it did on faces.
  """
  o = config.optim
  if o.name not in _OPTIMIZERS:
    raise ConfigError(f"optim.name: {o.name!r} is not one of {', '.join(_OPTIMIZERS)}")
  b1, b2 = float(o.get("b1", 0.9)), float(o.get("b2", 0.999))
  for key, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ConfigError(f"optim.{key}: must be in [0, 1), got {value}")
  if o.weight_decay and o.name != "adamw":
    raise ConfigError(f"optim.weight_decay: only optim.name='adamw' applies it (got {o.name!r})")
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(_OPTIMIZERS[o.name](learning_rate_schedule(config), o.weight_decay, b1, b2))
  return optax.chain(*parts)


def create_train_state(model: HVAE, tx: optax.GradientTransformation, rng) -> TrainState:
  params = ladder.init(model, rng)
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers, see below)
  # A copy, not an alias: the step donates the state, and a buffer cannot be donated twice.
  ema_params = jax.tree_util.tree_map(jnp.copy, params)
  return TrainState(step=zero(), params=params, ema_params=ema_params,
                    opt_state=tx.init(params), consecutive_skips=zero(), total_skips=zero())


def kl_beta(step, warmup_steps: int):
  """KL warm-up: beta rises linearly from 0 to 1 over `warmup_steps` (1 throughout if 0)."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def latent_dims(cfg: ModelConfig) -> tuple[int, ...]:
  """Number of latent dimensions of every level (for kl_per_dim)."""
  if not cfg.has_latents:
    return ()
  return tuple(int(np.prod(cfg.latent_shape(l))) for l in range(1, cfg.num_levels + 1))


def train_step(state: TrainState, batch, rng, *, model: HVAE, tx, loss_cfg: LossConfig,
               skip_threshold: float, ema_decay: float, lr_schedule):
  """One optimisation step on the global batch.

  Args:
    state: the train state (replicated).
    batch: {"image": uint8 [B,64,64,3], "mask": float32 [B,64,64,1]}, B the global batch.
    rng: the run's base key; the step's key is fold_in(rng, state.step).
    model, tx, loss_cfg, skip_threshold, ema_decay, lr_schedule: static, bound by
      `make_train_step`.

  The loss is `objective.loss` of the model's forward pass (every term is assembled there); the
  step only supplies the forward pass, the warm-up beta and the sleep term's model pass.

  Returns:
    (new state, metrics): scalars named as docs/design.md §7 without the `train/` prefix. An update
    whose gradient is non-finite or whose norm exceeds `skip_threshold` (> 0) is skipped:
    parameters, optimiser state and EMA stay as they were.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  sample_rng, dropout_rng = jax.random.split(step_rng)
  beta = kl_beta(state.step, loss_cfg.kl_warmup_steps)

  level_dims = latent_dims(model.config)

  anneal = model.config.likelihood_grad_anneal
  # None keeps the default step's graph as it was; the power changes gradients, not values.
  grad_power = likelihoods.location_grad_power(state.step, anneal) if anneal else None

  def sleep_fn(params, weights):  # its own key: the default run's streams stay as they were
    return remedies.sleep_loss(model, params, batch["image"], batch["mask"],
                               jax.random.fold_in(step_rng, 2), weights)[0]

  def loss_fn(params):
    out = model.apply({"params": params}, batch["image"], batch["mask"], train=True,
                      location_grad_power=grad_power,
                      rngs={"sample": sample_rng, "dropout": dropout_rng})
    return objective.loss(out, batch["mask"], params, beta=beta, cfg=loss_cfg, sleep_fn=sleep_fn)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  skip = ~jnp.isfinite(grad_norm) | ~jnp.isfinite(loss)
  if skip_threshold > 0:
    skip = skip | (grad_norm > skip_threshold)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # EMA warm-up: early on the average would be dominated by the initial parameters.
  step_f = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
  new_ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                   state.ema_params, new_params)
  keep = lambda old, new: jax.tree_util.tree_map(  # noqa: E731
      lambda o, n: jnp.where(skip, o, n), old, new)
  consecutive = jnp.where(skip, state.consecutive_skips + 1, 0)
  new_state = state.replace(
      step=state.step + 1, params=keep(state.params, new_params),
      ema_params=keep(state.ema_params, new_ema),
      opt_state=keep(state.opt_state, new_opt_state),
      consecutive_skips=consecutive, total_skips=state.total_skips + skip.astype(jnp.int32))

  metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": skip.astype(jnp.float32),
             # The optimiser's own count: skipped updates do not advance the schedule.
             "lr": lr_schedule(state.step - state.total_skips), "beta": beta,
             "consecutive_skips": consecutive.astype(jnp.float32)}
  if anneal:
    metrics["likelihood_grad_power"] = grad_power
  metrics.update(objective.bpd_metrics(terms))
  for l, dims in enumerate(level_dims, start=1):
    heads = {k: v for k, v in grads.get(f"level_{l}", {}).items() if k in objective.HEADS}
    metrics[metric_names.name("grad_norm", level=l)] = optax.global_norm(heads)
    metrics[metric_names.name("kl_per_dim", level=l)] = (
        metrics[metric_names.name("kl", level=l)] / dims)
  return new_state, metrics


def make_train_step(config, model: HVAE, tx, mesh: Mesh, loss_cfg: LossConfig | None = None):
  """Binds the static arguments of `train_step` and jits it once for `mesh`.

  `loss_cfg` is `LossConfig.from_config(config)` unless the caller has built it already.
  """
  if loss_cfg is None:
    loss_cfg = LossConfig.from_config(config)
  fn = functools.partial(
      train_step, model=model, tx=tx, loss_cfg=loss_cfg,
      skip_threshold=float(config.optim.skip_threshold),
      ema_decay=float(config.optim.ema_decay), lr_schedule=learning_rate_schedule(config))
  data, replicated = shardings(mesh)
  return jax.jit(fn, in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
