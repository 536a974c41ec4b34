"""Each per-level remedy does what it says (issue 5): free bits, weight decay, balancing."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import load_experiment, tiny_model_config

from hvae import objective, train
from hvae.mesh import make_mesh, shard_batch
from hvae.model import ladder
from hvae.model.ladder import HVAE


def test_channel_free_bits_zero_the_gradient_of_channels_below_the_floor():
  kl_channels = [jnp.array([[0.2, 3.0]] * 4)]  # level 1: channel 0 below 1 nat, channel 1 above

  def loss(kl_channels):
    terms = objective.ElboTerms(recon=jnp.ones(4), kl=jnp.stack([c.sum(-1) for c in kl_channels],
                                                                -1), num_dims=jnp.full(4, 3072.0))
    return objective.training_loss(terms, kl_weight=(1.0,), free_bits=(1.0,),
                                   kl_channels=kl_channels)[0]

  g = jax.grad(loss)(kl_channels)[0]
  np.testing.assert_array_equal(g[:, 0], 0.0)
  assert np.all(np.asarray(g[:, 1]) > 0)


def test_kl_balancing_coefficients_sum_to_L_and_follow_kl_per_dim():
  gamma = objective.kl_balancing_coeffs(jnp.array([0.5, 0.0, 2.0]))
  np.testing.assert_allclose(float(gamma.sum()), 3.0, rtol=1e-6)
  assert gamma[2] > gamma[0] > gamma[1]


def test_head_weight_decay_touches_only_its_levels_heads():
  cfg = tiny_model_config()
  params = ladder.init(HVAE(cfg), jax.random.PRNGKey(0))
  g = jax.grad(train.head_weight_penalty)(params, (0.0, 0.1, 0.0))
  for path, x in jax.tree_util.tree_leaves_with_path(g):
    key = jax.tree_util.keystr(path)
    touched = "level_2" in key and ("q_head" in key or "p_head" in key) and "kernel" in key
    assert bool(np.any(np.asarray(x) != 0)) == touched, key


def test_train_step_logs_per_level_head_gradient_norms_and_uses_remedies():
  config = load_experiment("tiny")
  config.loss.kl_balancing = True
  config.loss.kl_warmup_steps = 10
  config.loss.free_bits_per = "channel"
  config.loss.free_bits = (0.5,)
  config.regularize.head_weight_decay = (0.0, 1e-3)
  from hvae.config import ModelConfig

  mesh = make_mesh(jax.devices()[:1])
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  step = train.make_train_step(config, model, tx, mesh)
  rs = np.random.RandomState(0)
  mask = np.ones((8, 64, 64, 1), np.float32)
  mask[:, 16:48, 16:48] = 0
  batch = {"image": rs.randint(0, 256, (8, 64, 64, 3)).astype(np.uint8), "mask": mask}
  state, metrics = step(state, shard_batch(batch, mesh), jax.random.PRNGKey(1))
  for l in (1, 2):
    assert float(metrics[f"grad_norm/level_{l}"]) > 0
  assert np.isfinite(float(metrics["loss"]))
