"""The device mesh, and how batches and state are placed on it.

One 1-D mesh over every device of every process, axis `data`: batches are split along it,
everything else (parameters, optimiser state, keys) is replicated. The same code runs on one
CPU, 8 GPUs or a TPU slice; there is no pmap. Training (`hvae.train`), evaluation
(`hvae.evaluation`) and the diagnostics (`hvae.diagnostics`) all place their inputs here.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device (of every process), axis `data`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(split over the `data` axis, replicated): the two placements every jitted step uses."""
  return NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global arrays split over the `data` axis."""
  sharding, _ = shardings(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of `mesh` (replicated)."""
  _, replicated = shardings(mesh)
  return jax.device_put(tree, replicated)


def _pad(batch: dict, multiple: int) -> tuple[dict, int]:
  """Pads a batch to a multiple of the device count (repeating the last example)."""
  n = batch["image"].shape[0]
  pad = (-n) % multiple
  if pad:
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
  return batch, n


def prepare(batch: dict, mesh: Mesh) -> tuple[dict, np.ndarray]:
  """A host eval batch -> (global arrays with image/mask/weight, host weights).

  Batches may carry a `weight` [B] (0 = padding, as `hvae.data.eval_batches` pads the last
  batch); rows added here to fill every device get weight 0 too.
  """
  weight = np.asarray(batch.get("weight", np.ones(batch["image"].shape[0], np.float32)),
                      np.float32)
  padded, n = _pad({"image": batch["image"], "mask": batch["mask"], "weight": weight},
                   len(mesh.local_devices))
  padded["weight"] = padded["weight"].copy()
  padded["weight"][n:] = 0.0
  return shard_batch(padded, mesh), padded["weight"]
