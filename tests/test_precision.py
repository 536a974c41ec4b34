"""Tests of the speed and memory switches: `model.compute_dtype` (mixed precision) and
`model.remat` (rematerialised residual blocks); `model.likelihood_region` is in test_objective.

Every test uses the parameters of one float32 initialisation of the tiny experiment (neither
switch changes a parameter's path, shape or dtype), so the module compiles one init, one
forward pair, one gradient pair and one train step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import centre_mask, load_experiment, random_images

from hvae import objective, train
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.model import ladder
from hvae.model.ladder import HVAE
from hvae.typed_config import ConfigError, ModelConfig

B = 4
# bf16 keeps 8 significant bits: each rounding of an activation is off by at most u = 2^-9
# (~0.2 %). The tiny model's pixel and latent parameters sit behind ~10 rounded layers (stem,
# trunk and decoder blocks, projections): at worst ~10u = 2 % on one parameter, typically
# sqrt(10)u ~ 0.6 %, and the loss and each level's KL sum thousands of terms whose independent
# errors partly cancel. 1 % bounds that with room (measured on this batch: loss 1e-6, level KLs
# 0.2 %) and still fails on a gross precision bug; dtypes are asserted separately (the KLs,
# log-likelihoods and distribution parameters must be float32, not merely close).
BF16_LOSS_RTOL = 1e-2


def _config(**model) -> ModelConfig:
  return dataclasses.replace(ModelConfig.from_config(load_experiment("tiny")), **model)


@pytest.fixture(scope="module")
def params():
  return ladder.init(HVAE(_config()), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch():
  return {"image": random_images(B, seed=3), "mask": centre_mask(B)}


def _loss(model, params, batch, rng, *, train_pass=False):
  out = model.apply({"params": params}, batch["image"], batch["mask"], train=train_pass,
                    rngs={"sample": rng})
  terms = objective.elbo_terms(out, batch["mask"])
  loss, _ = objective.training_loss(terms, kl_weight=(1.0,) * len(out.levels),
                                    free_bits=(0.0,) * len(out.levels))
  return loss, out


# ------------------------------------------------------------------------------ config fields


def test_switch_defaults_and_validation():
  cfg = ModelConfig.from_config(load_experiment("base"))
  assert (cfg.compute_dtype, cfg.remat, cfg.likelihood_region) == ("float32", (False,) * 4, "all")
  assert ModelConfig.from_config(load_experiment("tiny")).remat == (False, False)
  with pytest.raises(ConfigError, match="model.compute_dtype"):
    _config(compute_dtype="float16")
  with pytest.raises(ConfigError, match="model.remat"):
    _config(remat=(True,))  # 1 entry for 2 levels (from_config broadcasts; the dataclass not)
  with pytest.raises(ConfigError, match=r"model.remat \(level 2\)"):
    _config(remat=(True, "False"))
  config = load_experiment("tiny")
  config.model.remat = (True,)
  assert ModelConfig.from_config(config).remat == (True, True)
  config.model.remat = ("no",)
  with pytest.raises(ConfigError, match="model.remat"):
    ModelConfig.from_config(config)


# ----------------------------------------------------------------------------- mixed precision


def test_bfloat16_forward_matches_float32_and_keeps_float32_where_it_must(params, batch):
  f32, bf16 = HVAE(_config()), HVAE(_config(compute_dtype="bfloat16"))
  # The bf16 model's own initialisation (traced, not compiled) is float32 too.
  shapes = jax.eval_shape(lambda: ladder.init(bf16, jax.random.PRNGKey(0)))
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}

  @jax.jit
  def both(params):
    rng = jax.random.PRNGKey(7)  # the same latent noise in both passes
    return _loss(f32, params, batch, rng), _loss(bf16, params, batch, rng)

  (loss32, out32), (loss16, out16) = both(params)
  for out in (out32, out16):
    assert out.log_px.dtype == out.px_params.dtype == jnp.float32
    for lev in out.levels:
      assert lev.kl.dtype == lev.log_q.dtype == lev.log_p.dtype == jnp.float32
      assert lev.p.mean.dtype == lev.q.log_scale.dtype == jnp.float32
  assert np.isfinite(float(loss16))
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=BF16_LOSS_RTOL)
  for lev16, lev32 in zip(out16.levels, out32.levels):
    np.testing.assert_allclose(float(jnp.sum(lev16.kl)), float(jnp.sum(lev32.kl)),
                               rtol=BF16_LOSS_RTOL)
  # ...and it is bf16 that ran: the values are not bit-identical.
  assert float(loss16) != float(loss32)


def test_bfloat16_training_run_has_no_nan_and_lowers_the_loss(params, batch):
  config = load_experiment("tiny")
  config.model.compute_dtype = "bfloat16"
  config.optim.learning_rate = 3e-3
  config.optim.ema_decay = 0.5
  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  mesh = make_mesh(jax.devices()[:1])
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
  copy = lambda: jax.tree_util.tree_map(jnp.copy, params)  # noqa: E731  (the step donates)
  state = train.TrainState(step=zero(), params=copy(), ema_params=copy(),
                           opt_state=tx.init(params), consecutive_skips=zero(),
                           total_skips=zero())
  state = replicate(state, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  rng = replicate(jax.random.PRNGKey(1), mesh)
  data = shard_batch(batch, mesh)
  losses = []
  for _ in range(40):
    state, metrics = step_fn(state, data, rng)
    losses.append(float(metrics["loss"]))
    assert float(metrics["skipped"]) == 0.0
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-5:].mean() < losses[:5].mean() - 0.1, losses
  state = jax.device_get(state)
  for tree in (state.params, state.ema_params, state.opt_state):
    floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert all(np.all(np.isfinite(x)) for x in floats)


# ------------------------------------------------------------------------------- rematerialise


def test_remat_gives_the_same_gradients(params, batch):
  plain, remat = HVAE(_config()), HVAE(_config(remat=(True, True)))

  @jax.jit
  def grads(params):
    rng = jax.random.PRNGKey(5)
    g = lambda m: jax.grad(lambda p: _loss(m, p, batch, rng)[0])(params)  # noqa: E731
    return g(plain), g(remat)

  traced = str(jax.make_jaxpr(lambda p: _loss(remat, p, batch, jax.random.PRNGKey(5))[0])(params))
  assert "checkpoint" in traced or "remat" in traced  # the blocks really are rematerialised
  g_plain, g_remat = grads(params)
  assert jax.tree_util.tree_structure(g_plain) == jax.tree_util.tree_structure(g_remat)
  for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(a))) + 1e-12)
