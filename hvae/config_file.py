"""Experiment configs on disk: `config.json` written by a run and loaded back, unchanged.

JSON has no tuples, so per-level fields come back as lists; `load_config` turns every list back
into a tuple (the config holds no other lists), so `load_config(save_config(c)) == c`.
"""

from __future__ import annotations

import json

import ml_collections

from hvae import atomic


def _tuplify(value):
  if isinstance(value, dict):
    return {k: _tuplify(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  return value


def save_config(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config as JSON (atomically: a crash never leaves half a file)."""
  atomic.write_json(path, config.to_dict(), indent=2, sort_keys=True)


def load_config(path: str) -> ml_collections.ConfigDict:
  """Reads a config written by `save_config`; returns it locked (unknown keys are errors)."""
  with open(path) as f:
    config = ml_collections.ConfigDict(_tuplify(json.load(f)))
  config.lock()
  return config
