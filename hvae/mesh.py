"""The device mesh, and how batches and state are placed on it.

One 1-D mesh over every device of every process, axis `data`: batches are split along it,
everything else (parameters, optimiser state, keys) is replicated. The same code runs on one
CPU, 8 GPUs or a TPU slice; there is no pmap. Training (`hvae.train`), evaluation
(`hvae.evaluation`) and the diagnostics (`hvae.diagnostics`) all place their inputs here.

Why `Mesh(...)` and not `jax.make_mesh` / `jax.set_mesh`: on jax 0.10 `jax.make_mesh` gives
*Explicit* axes by default (sharding in types: every array's type carries its sharding and
operations must agree on it), while the steps here are written for the *Auto* axes `Mesh`
gives (in/out shardings on `jax.jit`, XLA propagates the rest). Asking `jax.make_mesh` for
Auto axes removes no line, and a global `jax.set_mesh` would hide which mesh a step runs on
(the tests narrow it to some of the devices), so this module keeps its four small functions.
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


def allgather_rows(tree):
  """Every process's host arrays, concatenated along axis 0 in process order.

  Bit-exact for any dtype (float64 included, which a plain `process_allgather` would narrow to
  float32 without x64): the rows travel as bytes. A collective: every process calls it with the
  same structure, shapes and dtypes.

  Args:
    tree: a pytree of numpy arrays [n, ...] (n may differ between leaves, not between processes).

  Returns:
    The same pytree of numpy arrays [P * n, ...], process 0's rows first.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  leaves, treedef = jax.tree.flatten(jax.tree.map(np.ascontiguousarray, tree))
  raw = [x.reshape(x.shape[0], -1).view(np.uint8) for x in leaves]
  gathered = multihost_utils.process_allgather(raw, tiled=True)
  return treedef.unflatten([np.ascontiguousarray(g).view(x.dtype).reshape(-1, *x.shape[1:])
                            for g, x in zip(gathered, leaves)])


def take_rows(batches: list[dict], where: np.ndarray, picks: np.ndarray,
              keys: tuple[str, ...] = ("image", "mask")) -> dict[str, np.ndarray]:
  """Rows of host batches that may live on other processes, on every process.

  Args:
    batches: this process's host batches (its rows of each global batch).
    where: [N, 3] int, (process, batch, row in that process's batch) of each gathered example,
      as `hvae.evaluation.run_pass` returns it.
    picks: [K] positions into `where`.
    keys: the batch entries to take.

  Returns:
    {key: [K, ...]} in the order of `picks`. With several processes a collective: each
    process fills the rows it holds, and every process receives each row from its holder.
  """
  owner, batch, row = np.asarray(where)[np.asarray(picks, int)].reshape(-1, 3).T
  me = jax.process_index()
  blank = {k: np.zeros_like(batches[0][k][0]) for k in keys}  # a row another process holds
  local = {k: np.stack([batches[b][k][r] if p == me else blank[k]
                        for p, b, r in zip(owner, batch, row)]) for k in keys}
  if jax.process_count() == 1:
    return local
  gathered = allgather_rows({k: v[None] for k, v in local.items()})  # [P, K, ...]
  return {k: v[owner, np.arange(len(owner))] for k, v in gathered.items()}
