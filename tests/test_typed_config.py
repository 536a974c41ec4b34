"""Tests of hvae/typed_config.py: per-level broadcasting and errors that name the field."""

import pytest
from helpers import load_experiment

from hvae import loop
from hvae.typed_config import ConfigError, LossConfig, ModelConfig, per_level


def _base(**model):
  config = load_experiment("base")
  for k, v in model.items():
    section, key = k.split("__")
    config[section][key] = v
  return config


def test_base_config_resolves():
  config = load_experiment("base")
  cfg = ModelConfig.from_config(config)
  assert cfg.num_levels == config.model.num_levels
  assert cfg.latent_channels == (8,) * cfg.num_levels
  assert cfg.latent_shape(1) == (32, 32, 8)
  assert cfg.latent_shape(cfg.num_levels) == (config.model.top_latent_dim,)
  loss = LossConfig.from_config(config)
  assert loss.kl_weight == (1.0,) * cfg.num_levels and loss.free_bits == (0.0,) * cfg.num_levels


def test_per_level_broadcasts_length_one_and_keeps_length_L():
  assert per_level("x", (2,), 3, int) == (2, 2, 2)
  assert per_level("x", 0.5, 2) == (0.5, 0.5)
  assert per_level("x", (1, 2, 3), 3, int) == (1, 2, 3)


@pytest.mark.parametrize("field,value,match", [
    ("model__num_levels", 7, "model.num_levels"),
    ("model__num_levels", 0, "model.num_levels"),
    ("model__width", -4, "model.width"),
    ("model__top_latent_dim", 0, "model.top_latent_dim"),
    ("model__latent_channels", (4, 4), "model.latent_channels"),
    ("model__latent_channels", (4, -1, 4, 4), r"model.latent_channels \(level 2\)"),
    ("model__posterior", "sideways", "model.posterior"),
    ("model__likelihood", "bernoulli", "model.likelihood"),
    ("model__kind", "gan", "model.kind"),
    ("model__top_prior", "uniform", "model.top_prior"),
    ("regularize__dropout", (0.1, 0.2), "regularize.dropout"),
    ("regularize__dropout", (1.5,), "regularize.dropout"),
    ("regularize__sigma_floor", (-0.1,), "regularize.sigma_floor"),
    ("model__likelihood_grad_anneal", (500, 100), "model.likelihood_grad_anneal"),
    ("model__likelihood_grad_anneal", (100, 500), "already 'exact'"),  # base: exact gradients
])
def test_bad_model_fields_are_named(field, value, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config(_base(**{field: value}))


@pytest.mark.parametrize("field,value,match", [
    ("loss__kl_weight", (1.0, 1.0), "loss.kl_weight"),
    ("loss__free_bits", (1.0, 2.0, 3.0), "loss.free_bits"),
    ("loss__free_bits", (-1.0,), "loss.free_bits"),
])
def test_bad_loss_fields_are_named(field, value, match):
  with pytest.raises(ConfigError, match=match):
    LossConfig.from_config(_base(**{field: value}))


@pytest.mark.parametrize("name,arg", [("quickstart", None), ("quickstart", "deterministic"),
                                      ("faces_cpu", None), ("faces_cpu", "deterministic"),
                                      ("celeba_l4", None), ("tiny", None)])
def test_every_shipped_experiment_passes_the_run_s_validation(name, arg):
  """What `launch.py` checks before compiling, on each experiment file a user runs (no other
  test trains the faces or CelebA recipe): a per-level value of the wrong length, a retired key
  or a bad choice would fail here, not minutes into a user's run."""
  model_cfg, loss_cfg = loop.validate(load_experiment(name, arg))
  assert len(loss_cfg.free_bits) == model_cfg.num_levels
