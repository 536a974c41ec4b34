"""Tests of hvae/train.py: the jitted, sharded train step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import centre_mask, load_experiment, random_images

from hvae import train
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.model.ladder import HVAE
from hvae.typed_config import ModelConfig


def _config(**optim):
  config = load_experiment("tiny")
  config.optim.ema_decay = 0.5
  for k, v in optim.items():
    config.optim[k] = v
  return config


def _batch(n=8, seed=0):
  return {"image": random_images(n, seed), "mask": centre_mask(n)}


def _run(config, devices, steps=2, count_traces=None):
  mesh = make_mesh(devices)
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = replicate(train.create_train_state(model, tx, jax.random.PRNGKey(0)), mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  rng = replicate(jax.random.PRNGKey(1), mesh)
  losses = []
  for i in range(steps):
    state, metrics = step_fn(state, shard_batch(_batch(seed=i), mesh), rng)
    losses.append(metrics["loss"])
  return jax.device_get(state), np.asarray(jax.device_get(losses))


def test_eight_devices_match_one_device_and_trace_once(monkeypatch):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  chex.clear_trace_counter()
  # A second trace of the sharded step (a silent recompile every step) raises AssertionError.
  monkeypatch.setattr(train, "train_step", chex.assert_max_traces(train.train_step, n=1))
  config = _config()
  state8, loss8 = _run(config, jax.devices(), steps=3)
  monkeypatch.undo()  # the one-device run below is a second, legitimate compilation
  state1, loss1 = _run(config, jax.devices()[:1], steps=3)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # Adam divides by sqrt(v): for a parameter with a near-zero gradient, the reduction-order
  # noise of 8 partial sums vs 1 shows up at ~1e-5 of lr-sized updates, hence the atol.
  for a, b in zip(jax.tree_util.tree_leaves(state8.params),
                  jax.tree_util.tree_leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  assert int(state8.step) == 3


def test_no_host_transfer_inside_the_step():
  config = _config()
  mesh = make_mesh()
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = replicate(train.create_train_state(model, tx, jax.random.PRNGKey(0)), mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  rng = replicate(jax.random.PRNGKey(1), mesh)
  batch = shard_batch(_batch(), mesh)
  state, _ = step_fn(state, batch, rng)  # compile outside the guard
  history = []
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, metrics = step_fn(state, batch, rng)
      history.append(metrics)
  assert len(history) == 3


def test_non_finite_gradient_skips_the_update():
  config = _config()
  mesh = make_mesh(jax.devices()[:1])
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  before = jax.device_get(state)
  step_fn = train.make_train_step(config, model, tx, mesh)
  bad = _batch()
  bad["image"] = bad["image"].astype(np.float32)
  bad["image"][0, 0, 0, 0] = np.nan  # a NaN given pixel poisons the gradient
  state, metrics = step_fn(state, shard_batch(bad, mesh), jax.random.PRNGKey(1))
  assert float(metrics["skipped"]) == 1.0 and int(state.consecutive_skips) == 1
  for a, b in zip(jax.tree_util.tree_leaves(before.params),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(before.opt_state),
                  jax.tree_util.tree_leaves(state.opt_state)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 1


def test_gradient_norm_threshold_skips_and_resets():
  config = _config(skip_threshold=1e-6)
  mesh = make_mesh(jax.devices()[:1])
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  step_fn = train.make_train_step(config, model, tx, mesh)
  for i in range(2):
    state, metrics = step_fn(state, shard_batch(_batch(seed=i), mesh),
                             jax.random.PRNGKey(1))
  assert int(state.consecutive_skips) == 2 and int(state.total_skips) == 2


def test_kl_warmup_is_linear():
  beta = lambda s: float(train.kl_beta(jnp.asarray(s), 100))  # noqa: E731
  assert beta(0) == 0.0 and beta(50) == pytest.approx(0.5) and beta(100) == beta(500) == 1.0
  assert float(train.kl_beta(jnp.asarray(0), 0)) == 1.0


@pytest.mark.parametrize("field,value,match", [
    ("name", "sgd", "optim.name"), ("schedule", "linear", "optim.schedule"),
    ("b2", 1.0, "optim.b2"), ("b1", -0.1, "optim.b1")])
def test_bad_optimizer_fields_are_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    train.create_optimizer(_config(**{field: value}))


def test_a_small_b2_keeps_updates_their_size_while_gradients_grow():
  """The anneal's spike (docs/results.md): location gradients grow ~3.5 % a step over the
  anneal (scale**p, p from 1 to 0 in 200 steps, scale ~1e-3). Adam's second moment with
  b2 = 0.999 lags such growth and each update becomes several times the learning rate; with
  VDVAE's b2 = 0.9 it stays near it. Global-norm clipping (the recipe's 200, or 20) does not
  help once the norm is below the clip: the growth is per parameter."""
  def largest_update(b2, growth=1.035, steps=200, warm=500):
    config = _config(name="adam", b2=b2, schedule="constant", warmup_steps=0, grad_clip=0.0)
    tx = train.create_optimizer(config)
    params = {"w": jnp.zeros((4,))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    sizes = []
    for t in range(warm + steps):
      g = {"w": jnp.full((4,), 1e-3 * growth ** max(t - warm, 0), jnp.float32)}
      updates, state = update(g, state, params)
      sizes.append(float(jnp.max(jnp.abs(updates["w"]))))
    lr = config.optim.learning_rate
    return max(sizes[warm:]) / lr
  assert largest_update(0.999) > 3.0  # measured 4.5 (and still rising: 8.3 in the limit)
  assert largest_update(0.9) < 1.5  # measured 1.0


def test_deterministic_baseline_trains_with_per_level_loss_fields():
  config = _config()
  config.model.kind = "deterministic"
  config.loss.free_bits = (0.5, 0.5)  # per-level fields are ignored without latents, not errors
  mesh = make_mesh(jax.devices()[:1])
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  step_fn = train.make_train_step(config, model, tx, mesh)
  state, metrics = step_fn(state, shard_batch(_batch(), mesh), jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"]))
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["bpd"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["bpd"]), float(metrics["recon_bpd"]), rtol=1e-6)
  assert not any(k.startswith("kl") for k in metrics)


def test_annealed_location_gradients_change_gradients_not_losses():
  """`model.likelihood_grad_anneal`: the step logs p (1 before the anneal, 0 after) and every
  loss equals the un-annealed run's (only gradients differ, and those only once p < 1)."""
  config = _config()
  config.model.likelihood_grad = "scaled"
  annealed = _config()
  annealed.model.likelihood_grad = "scaled"
  annealed.model.likelihood_grad_anneal = (1, 2)  # p = 1, 1, 0 at steps 0, 1, 2
  mesh = make_mesh(jax.devices()[:1])
  powers, runs = [], []
  for cfg in (config, annealed):
    model = HVAE(ModelConfig.from_config(cfg))
    tx = train.create_optimizer(cfg)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    step_fn = train.make_train_step(cfg, model, tx, mesh)
    losses = []
    for i in range(3):
      state, metrics = step_fn(state, shard_batch(_batch(seed=i), mesh), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
      if cfg is annealed:
        powers.append(float(metrics["likelihood_grad_power"]))
    runs.append((losses, jax.device_get(state.params)))
  assert powers == [1.0, 1.0, 0.0]
  # Steps 0-1 took identical updates, so step 2's loss (before its own update) agrees too.
  np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
  diff = [np.max(np.abs(a - b)) for a, b in zip(jax.tree_util.tree_leaves(runs[0][1]),
                                                 jax.tree_util.tree_leaves(runs[1][1]))]
  assert max(diff) > 0  # step 2's update used exact gradients
