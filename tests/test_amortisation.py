"""Tests of hvae/amortisation.py: per-example posterior refinement and the gap's split."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import centre_mask, random_images, tiny_model_config

from hvae import amortisation, evaluation, preemption, split_report
from hvae.mesh import make_mesh
from hvae.model import ladder
from hvae.model.ladder import HVAE

B = 2


@pytest.fixture(scope="module")
def setup():
  """A 2-level top_down tiny model, its refine step (compiled once here) and two batches."""
  model = HVAE(tiny_model_config(num_levels=2, posterior="top_down"))
  params = ladder.init(model, jax.random.PRNGKey(0))
  mesh = make_mesh(jax.devices()[:1])
  batches = [{"image": random_images(B, seed=s), "mask": centre_mask(B),
              "weight": np.ones(B, np.float32)} for s in (0, 1)]
  return model, params, mesh, amortisation.make_refine_step(model, mesh), batches


def _run(setup, steps, free=(1.0, 1.0), batch=0, lr=0.05):
  model, params, mesh, step, batches = setup
  arrays = {k: jnp.asarray(v) for k, v in batches[batch].items()}
  out = step(params, arrays, jax.random.PRNGKey(7), jnp.asarray(free, jnp.float32),
             jnp.int32(steps), jnp.float32(lr))
  return jax.device_get(out)


def _nelbo(out, when):
  return out[f"recon_{when}"] + out[f"kl_{when}"].sum(-1)


def _fit(out, when):
  return out[f"nelbo_fit_{when}"]


def test_zero_steps_is_the_evaluation_pass_exactly(setup):
  model, params, _, _, batches = setup
  out = _run(setup, 0)
  ref = evaluation.make_elbo_fn(model)(params, batches[0]["image"], batches[0]["mask"],
                                       jax.random.PRNGKey(7))
  np.testing.assert_array_equal(out["recon_before"], np.asarray(ref["recon"]))
  np.testing.assert_array_equal(out["kl_before"], np.asarray(ref["kl"]))
  np.testing.assert_array_equal(out["recon_after"], out["recon_before"])
  np.testing.assert_array_equal(out["kl_after"], out["kl_before"])
  np.testing.assert_array_equal(out["nelbo_fit_after"], out["nelbo_fit_before"])
  assert not np.allclose(out["nelbo_fit_before"], _nelbo(out, "before"))  # other noise


def test_refinement_never_lowers_an_examples_elbo_and_compiles_once(setup):
  step = setup[3]
  for steps, free, lr in ((15, (1.0, 1.0), 0.05), (15, (0.0, 1.0), 0.05), (3, (1.0, 0.0), 5.0)):
    out = _run(setup, steps, free, lr=lr)
    assert np.all(_fit(out, "after") <= _fit(out, "before")), (steps, free, lr)
  out = _run(setup, 15)
  assert np.all(_fit(out, "after") < _fit(out, "before") - 1.0)  # it recovers on its objective
  # (scored on noise it did not fit, an example may come out worse: not asserted)
  assert step.cache_sizes() == (1, 1, 1)  # S, the level mask and the step size are arguments


def test_the_stepwise_refinement_equals_the_single_traced_loop(setup):
  """S = 3 jitted steps give `refine`'s numbers (all S steps in one jitted loop), bit for bit."""
  model, params, _, step, batches = setup
  exact = amortisation.exact_gradients(model)
  single = jax.jit(lambda p, image, mask, rng, free, steps, lr: amortisation.refine(
      exact, p, image, mask, rng, free, steps, lr))
  for free in ((1.0, 1.0), (0.0, 1.0)):
    want = jax.device_get(single(params, batches[0]["image"], batches[0]["mask"],
                                 jax.random.PRNGKey(7), jnp.asarray(free), jnp.int32(3),
                                 jnp.float32(0.05)))
    got = _run(setup, 3, free)
    assert set(got) == set(want) - {"offsets"}
    for name, value in got.items():
      np.testing.assert_array_equal(value, want[name], err_msg=f"{name}, free {free}")
  # Asking for stop requests (and so waiting for each step before queueing the next) changes
  # nothing either.
  arrays = {k: jnp.asarray(v) for k, v in batches[0].items()}
  paced = jax.device_get(step(params, arrays, jax.random.PRNGKey(7), jnp.asarray(free),
                              jnp.int32(3), jnp.float32(0.05), interrupt=lambda: False))
  for name, value in paced.items():
    np.testing.assert_array_equal(value, got[name], err_msg=name)
  assert step.cache_sizes() == (1, 1, 1)


def test_a_stop_request_ends_the_refinement_between_two_steps(setup):
  """`interrupt()` is asked before every step: once it says True, no further step runs."""
  _, params, _, step, batches = setup
  arrays = {k: jnp.asarray(v) for k, v in batches[0].items()}
  asked = []
  calls = []
  run_steps = step.step

  def counting(*args):
    calls.append(int(args[4]))  # the first step of the call
    return run_steps(*args)

  step.step = counting
  try:
    with pytest.raises(preemption.Interrupted):
      step(params, arrays, jax.random.PRNGKey(7), jnp.ones(2), jnp.int32(10**6), jnp.float32(0.05),
           interrupt=lambda: asked.append(1) or len(asked) > 3)
  finally:
    step.step = run_steps
  assert calls == [0, 1, 2] and len(asked) == 4  # a million steps asked for, three ran


def test_levels_left_frozen_keep_the_encoders_posterior(setup):
  out = _run(setup, 10, free=(0.0, 0.0))
  np.testing.assert_allclose(_nelbo(out, "after"), _nelbo(out, "before"), rtol=1e-6)
  np.testing.assert_allclose(_fit(out, "after"), _fit(out, "before"), rtol=1e-6)


def test_recovery_from_the_refined_optimum_is_about_zero():
  """An encoder that already outputs the optimum leaves nothing to recover: refining again from
  the refined offsets wins back < 1 % of what the first refinement did."""
  model = HVAE(tiny_model_config(num_levels=1))  # one 4-d latent: converges in few steps
  params = ladder.init(model, jax.random.PRNGKey(1))
  image, mask, rng = random_images(1, seed=3), centre_mask(1), jax.random.PRNGKey(2)
  zeros = amortisation._zero_offsets(model.config, 1)  # noqa: SLF001

  @functools.partial(jax.jit, static_argnums=1)
  def refine(init, steps):
    return amortisation.refine(model, params, image, mask, rng, jnp.ones(1), steps, 0.1, init)

  first = refine(zeros, 80)
  again = refine(first["offsets"], 80)
  gain = _fit(first, "before") - _fit(first, "after")
  regain = _fit(again, "before") - _fit(again, "after")
  np.testing.assert_allclose(_fit(again, "before"), _fit(first, "after"), rtol=1e-6)
  assert np.all(gain > 1.0) and np.all(regain <= 0.01 * gain), (gain, regain)


def test_split_on_two_splits_adds_up_and_matches_the_evaluation_pass(setup):
  model, params, mesh, _, batches = setup
  rng = jax.random.PRNGKey(3)
  sets = {"eval": batches[:1], "eval_train": batches[1:]}
  s = amortisation.Settings(steps=5, examples=B, lr=0.05)
  m = amortisation.Split(model, mesh, sets, rng, s)(params)
  gap = m["gap/refine/bpd"]
  assert m["gap/refine/encoder_bpd"] + m["gap/refine/decoder_bpd"] == pytest.approx(gap, abs=1e-9)
  parts = m["gap/refine/decoder_bpd/recon"] + sum(
      m[f"gap/refine/decoder_bpd/level_{l}"] for l in (1, 2))
  assert parts == pytest.approx(m["gap/refine/decoder_bpd"], abs=1e-6)
  eval_step = evaluation.make_eval_step(model, mesh)
  for split in sets:
    r = evaluation.run_pass(eval_step, params, sets[split], rng, mesh)
    bpd = evaluation.summarize(r["per_example"], (2048, 4))["bpd"]
    assert m[f"{split}/refine/bpd_before"] == pytest.approx(bpd, rel=1e-6)
    assert np.isfinite(m[f"{split}/refine/recovered_bpd"])
    assert m[f"{split}/refine/recovered_bpd_fit"] >= 0
    for l in (1, 2):
      assert np.isfinite(m[f"{split}/refine/recovered/level_{l}"])
      assert m[f"{split}/mi/level_{l}"] <= m[f"{split}/mi_max"] + 1e-9
  lines = "\n".join(split_report.markdown(m, 2, "## split"))
  assert "**encoder**" in lines and "I(n; z_l)" in lines


def test_settings_read_the_eval_section_and_the_flag():
  import ml_collections

  c = ml_collections.ConfigDict({"eval": {"refine_steps": 0, "refine_examples": 8,
                                          "refine_lr": 0.1}})
  assert amortisation.settings(c) == amortisation.Settings(0, 8, 0.1, 1)
  assert amortisation.settings(c, steps=20).steps == 20
  assert amortisation.settings(ml_collections.ConfigDict({"eval": {}})) == \
      amortisation.Settings()  # configs written before the keys: off
  with pytest.raises(ValueError, match="eval.refine_"):
    amortisation.settings(c, steps=-1)


def test_refinement_follows_the_exact_gradient_whatever_training_used():
  scaled = HVAE(tiny_model_config(likelihood_grad="scaled", likelihood_grad_anneal=(0, 10)))
  exact = amortisation.exact_gradients(scaled)
  assert exact.config.likelihood_grad == "exact" and exact.config.likelihood_grad_anneal == ()
  assert dict(exact.config.__dict__, likelihood_grad="scaled", likelihood_grad_anneal=(0, 10)) \
      == scaled.config.__dict__  # nothing else changes: the same parameters apply
