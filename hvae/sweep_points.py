"""A sweep's points, without JAX: expanded, named, configured and recorded (docs/sweeps.md).

The convention, the same for every experiment file: next to `get_config(arg)` the file may define

  def sweep(arg: str | None = None) -> list[dict]:
    return [{"model.num_levels": L, "seed": s} for L in (1, 2, 3) for s in (0, 1)]

one dict per point, mapping dotted config keys to values (the seed is an ordinary axis, `seed`).
Point i trains `get_config(arg)` (with any `--config.a.b=` flags) plus its overrides in
`WORKDIR/<name>/`, where the name is built from the overrides alone (sorted keys, `seed` last,
short aliases from `ALIASES`): `L3_post-top_down_seed1`. It is therefore stable across runs and
independent of the order the dict was written in; duplicates are an error. `sweep.json` in
WORKDIR lists every point (index, name, group, overrides) for `--mode=report`, and each point's
directory tells its status (`status`).

Everything here is pure Python, so `--sweep --dry_run` is instant and the sweep report
(hvae/sweep_report.py) needs no JAX; running the points is hvae/sweep.py.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from hvae import atomic
from hvae.errors import SweepError
from hvae.typed_config import ConfigError, LossConfig, ModelConfig

MANIFEST = "sweep.json"
FLOPS_FILE = "flops.json"
FAILED_FILE = "FAILED"
EVAL_CHECKPOINT = "best"  # the checkpoint each point's closing IW evaluation reads
BASELINE = "baseline"  # the name of a point (or group) without overrides
MAX_NAME = 80  # longer names are cut and end in a hash of the overrides (still unique)

# Short names of common axes in point names; "" = the value alone (`deterministic`). Other keys
# use their last component (`optim.warmup_steps` -> `warmup_steps50`).
ALIASES = {
    "model.kind": "", "model.num_levels": "L", "model.posterior": "post",
    "model.context_skips": "skips", "model.top_prior": "top", "model.likelihood": "lik",
    "model.latent_channels": "ch", "model.top_latent_dim": "top_dim", "model.width": "w",
    "model.posterior_sees_mask": "qmask", "loss.kl_weight": "klw", "loss.free_bits": "fb",
    "loss.kl_warmup_steps": "warmup", "loss.kl_balancing": "klbal",
    "regularize.dropout": "drop", "regularize.sigma_floor": "sigfloor",
    "regularize.head_weight_decay": "headwd", "regularize.posterior_dropout": "qdrop",
    "regularize.posterior_noise": "qnoise", "regularize.posterior_head_weight_decay": "qheadwd",
    "regularize.sleep_weight": "sleep", "optim.learning_rate": "lr",
    "optim.ema_decay": "ema", "train.batch_size": "bs", "train.num_steps": "steps",
    "data.train_mask": "mask", "seed": "seed",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._,+-]")


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of a sweep."""

  index: int  # position in the experiment's sweep(arg) list (the SLURM array index)
  name: str  # the point's directory under the sweep's workdir
  overrides: dict[str, Any]  # dotted config key -> value

  @property
  def group(self) -> str:
    """The name without the seed: points differing only in `seed` share it."""
    return group_name(self.overrides)


# --- names -----------------------------------------------------------------------------------


def _text(value) -> str:
  if isinstance(value, bool):
    return "on" if value else "off"
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, list | tuple):
    return ",".join(_text(v) for v in value)
  return str(value)


def _part(key: str, value, alias: str) -> str:
  if not alias:
    return _text(value)
  sep = "-" if isinstance(value, str | bool) else ""  # L3, but post-top_down
  return f"{alias}{sep}{_text(value)}"


def canonical(overrides: Mapping[str, Any]) -> str:
  """The overrides as sorted JSON (tuples as lists): equal for equal overrides."""
  return json.dumps(dict(overrides), sort_keys=True, default=list)


def point_name(overrides: Mapping[str, Any]) -> str:
  """A short, readable directory name that depends only on the overrides' contents.

  Args:
    overrides: dotted config key -> value.

  Returns:
    The parts `alias+value` joined by `_`, keys sorted with `seed` last (e.g.
    `L3_post-top_down_seed1`); `baseline` when there are no overrides, `baseline_seed1` when
    `seed` is the only one.
  """
  keys = sorted(overrides, key=lambda k: (k == "seed", k))
  tails = [k.rsplit(".", 1)[-1] for k in keys]
  parts = []
  for key, tail in zip(keys, tails):
    alias = ALIASES.get(key, tail if tails.count(tail) == 1 else key)
    parts.append(_part(key, overrides[key], alias))
  if keys == ["seed"]:
    parts.insert(0, BASELINE)  # baseline_seed0 rather than a bare seed0
  name = _UNSAFE.sub("-", "_".join(parts)).lstrip(".") or BASELINE
  if len(name) > MAX_NAME:
    digest = hashlib.sha1(canonical(overrides).encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME - 9]}_{digest}"
  return name


def group_name(overrides: Mapping[str, Any]) -> str:
  """The point name of the overrides without `seed`."""
  return point_name({k: v for k, v in overrides.items() if k != "seed"})


def expand(dicts: Sequence[Mapping[str, Any]]) -> list[Point]:
  """Checks a sweep's override dicts and names them.

  Args:
    dicts: what an experiment's `sweep(arg)` returned.

  Returns:
    One Point per dict, in order.

  Raises:
    SweepError: not a list of dicts with string keys, or two points with the same name.
  """
  if isinstance(dicts, Mapping) or not isinstance(dicts, Sequence) or not dicts:
    raise SweepError(f"sweep(arg) must return a non-empty list of override dicts, got {dicts!r}")
  points, seen = [], {}
  for i, d in enumerate(dicts):
    if not isinstance(d, Mapping) or not all(isinstance(k, str) for k in d):
      raise SweepError(f"sweep point {i}: {d!r} is not a dict of dotted config keys")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    name = point_name(overrides)
    if name in seen:
      raise SweepError(f"sweep points {seen[name]} and {i} have the same name {name!r} "
                       f"(overrides {canonical(dicts[seen[name]])} and {canonical(d)})")
    seen[name] = i
    points.append(Point(i, name, overrides))
  return points


# --- experiment files and configs ------------------------------------------------------------


def load_points(config_filename: str) -> list[Point]:
  """The points of `experiments/FILE.py[:ARG]`: its `sweep(ARG)`, expanded.

  Args:
    config_filename: what `--config=` was given (path, optionally `:ARG`).

  Raises:
    SweepError: the file defines no `sweep` function.
  """
  path, _, arg = config_filename.partition(":")
  spec = importlib.util.spec_from_file_location(f"hvae_sweep_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise SweepError(f"--config={config_filename}: cannot load {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "sweep", None)
  if not callable(fn):
    raise SweepError(f"{path} defines no sweep(arg) function; see docs/sweeps.md")
  return expand(fn(arg or None))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted-key overrides set (the config stays locked).

  Raises:
    ConfigError: a key that is not in the config, or a value of the wrong type; the message
      starts with the key.
  """
  config = copy.deepcopy(config)
  for key, value in sorted(overrides.items()):
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"{key}: {'.'.join(parents[:i + 1])} is not a config section")
    if leaf not in node:
      raise ConfigError(f"{key}: no such config key")
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{key}: {e}") from None
  return config


def point_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The point's config, checked (model and loss fields) before anything is compiled."""
  try:
    c = apply_overrides(config, point.overrides)
    ModelConfig.from_config(c)
    LossConfig.from_config(c)
  except ConfigError as e:
    raise ConfigError(f"sweep point {point.index} ({point.name}): {e}") from None
  return c


def select(points: Sequence[Point], index: int | None) -> list[Point]:
  """All points, or only point `index` (`--sweep_index`).

  Raises:
    SweepError: `index` outside 0..len(points)-1, naming the valid range.
  """
  if index is None:
    return list(points)
  if not 0 <= index < len(points):
    raise SweepError(f"--sweep_index={index} is out of range: this sweep has {len(points)} "
                     f"points, valid indices are 0..{len(points) - 1} (see --sweep --dry_run)")
  return [points[index]]


# --- the workdir ------------------------------------------------------------------------------


def status(point_dir: str) -> str:
  """done | trained (no IW evaluation yet) | failed | in progress | not started."""
  exists = lambda name: os.path.exists(os.path.join(point_dir, name))  # noqa: E731
  if exists("DONE"):
    return "done" if exists(os.path.join("eval", "results.json")) else "trained"
  if exists(FAILED_FILE):
    return "failed"
  return "in progress" if exists("config.json") else "not started"


def write_manifest(workdir: str, experiment: str, points: Sequence[Point]) -> str:
  """Writes WORKDIR/sweep.json: the experiment and every point (index, name, group, overrides)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MANIFEST)
  # Atomic, with a temporary name per writer: array tasks may write the same manifest at once.
  atomic.write_json(path, {
      "experiment": experiment,
      "written": datetime.datetime.now(datetime.UTC).isoformat(),
      "points": [{"index": p.index, "name": p.name, "group": p.group, "overrides": p.overrides}
                 for p in points]}, default=list)
  return path


def read_manifest(workdir: str) -> dict | None:
  """WORKDIR/sweep.json, or None."""
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def describe(experiment: str, points: Sequence[Point], workdir: str) -> str:
  """The dry run's text: one line per point (index, name, status, workdir, overrides)."""
  lines = [f"sweep {experiment}: {len(points)} point(s) in {workdir}"]
  width = max(len(p.name) for p in points)
  for p in points:
    d = os.path.join(workdir, p.name)
    lines.append(f"{p.index:4d}  {p.name:<{width}}  [{status(d)}]  {d}  {canonical(p.overrides)}")
  return "\n".join(lines)


def check_same_config(point_dir: str, config: ml_collections.ConfigDict) -> None:
  """A point's directory must not hold a run of another config (e.g. the other ARG's)."""
  path = os.path.join(point_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = flatten(json.load(f))
  new = flatten(json.loads(json.dumps(config.to_dict(), default=list)))
  differ = sorted(k for k in old.keys() | new.keys()
                  if old.get(k) != new.get(k) and k != "train.num_steps")  # raising it resumes
  if differ:
    raise SweepError(f"{point_dir} holds a run of another config ({', '.join(differ[:5])} "
                     "differ); use another --workdir for this sweep")


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dicts (a config.json) -> {"dotted.key": value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
