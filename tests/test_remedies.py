"""Each per-level remedy does what it says (issues 5, 15): free bits, weight decay, balancing,
and the encoder-only remedies (posterior dropout and noise, posterior head decay, sleep)."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import centre_mask, load_experiment, random_images, tiny_model_config

from hvae import objective, remedies, train
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
  g = jax.grad(objective.head_weight_penalty)(params, (0.0, 0.1, 0.0))
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
  # The encoder-only remedies too (their properties: the tests below).
  config.regularize.posterior_dropout = (0.1, 0.0)
  config.regularize.posterior_noise = (0.0, 0.1)
  config.regularize.posterior_head_weight_decay = (1e-3,)
  config.regularize.sleep_weight = (0.5, 1.0)
  from hvae.typed_config import ModelConfig

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


# ------------------------------------------------------------- encoder-only remedies (issue 15)


def test_posterior_dropout_and_noise_act_on_the_posterior_in_training_only():
  plain = ladder.Level(tiny_model_config(num_levels=2), 1)
  noisy = ladder.Level(tiny_model_config(num_levels=2, posterior_dropout=(0.5, 0.0),
                                         posterior_noise=(0.3, 0.0)), 1)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 8))
  rngs = {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
  variables = plain.init(rngs, h, True, method=ladder.Level.posterior)
  variables = {"params": {**variables["params"], **plain.init(
      rngs, h, True, method=ladder.Level.prior)["params"]}}

  def run(level, method, training):
    return level.apply(variables, h, training, method=method, rngs={"dropout": rngs["dropout"]})

  for training in (False, True):
    np.testing.assert_array_equal(run(plain, ladder.Level.prior, training).mean,
                                  run(noisy, ladder.Level.prior, training).mean)  # never
    same = np.array_equal(run(plain, ladder.Level.posterior, training).mean,
                          run(noisy, ladder.Level.posterior, training).mean)
    assert same == (not training)  # the posterior's input, in training only


def test_posterior_head_weight_decay_touches_only_the_posterior_heads():
  params = ladder.init(HVAE(tiny_model_config()), jax.random.PRNGKey(0))
  g = jax.grad(objective.head_weight_penalty)(params, (0.1, 0.0, 0.0),
                                           objective.POSTERIOR_HEADS)
  for path, x in jax.tree_util.tree_leaves_with_path(g):
    key = jax.tree_util.keystr(path)
    touched = "level_1" in key and "q_head" in key and "kernel" in key
    assert bool(np.any(np.asarray(x) != 0)) == touched, key


def test_sleep_term_fits_only_the_posterior_to_the_latents_of_its_dreams():
  model = HVAE(tiny_model_config(num_levels=1, posterior="top_down"))
  params = ladder.init(model, jax.random.PRNGKey(0))
  image, mask, rng = random_images(2), centre_mask(2), jax.random.PRNGKey(3)

  @jax.jit
  def value_and_grad(p):
    return jax.value_and_grad(lambda q: remedies.sleep_loss(
        model, q, image, mask, rng, (1.0,), train=False)[0])(p)

  loss, g = value_and_grad(params)
  for path, x in jax.tree_util.tree_leaves_with_path(g):
    key = jax.tree_util.keystr(path)
    moved = bool(np.any(np.asarray(x) != 0))
    assert moved == ("q_head" in key), key  # no mask projection in this model
  step = jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, params, g)
  assert float(value_and_grad(step)[0]) < float(loss)  # same dreams, better fit of q
  x, zs = jax.jit(lambda p: remedies.dream(model, p, image, mask, rng))(params)  # one compile
  np.testing.assert_array_equal(np.asarray(x) * mask, image * mask)  # the context is kept
  assert [z.shape[1:] for z in zs] == [model.config.latent_shape(1)]
