"""A sweep's results as numbers, for hvae/sweep_report.py's tables and plots: which directories
are sweeps, their points (`sweep.json`, or inferred from the run subdirectories), everything the
report shows about one point (`point_figures`), and the per-group statistics.

Reads files only (the run loader of hvae/metrics_file.py): no JAX, no plotting.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from hvae import sweep_points, verdict
from hvae.metric_names import name as metric
from hvae.metrics_file import Run, finite, load_run


def is_sweep_dir(workdir: str) -> bool:
  """True for a directory with sweep.json, or with run subdirectories but no run of its own."""
  if os.path.exists(os.path.join(workdir, sweep_points.MANIFEST)):
    return True
  if os.path.exists(os.path.join(workdir, "config.json")) or not os.path.isdir(workdir):
    return False
  return bool(run_subdirs(workdir))


def run_subdirs(workdir: str) -> list[str]:
  """The subdirectories of `workdir` that hold a run (a config.json), sorted."""
  return sorted(d for d in os.listdir(workdir)
                if os.path.exists(os.path.join(workdir, d, "config.json")))


def list_points(workdir: str) -> tuple[str, list[dict]]:
  """(experiment, [{"index", "name", "group", "overrides"}]) from sweep.json, else inferred."""
  manifest = sweep_points.read_manifest(workdir)
  if manifest is not None:
    return manifest.get("experiment", "?"), manifest["points"]
  names = run_subdirs(workdir)
  flat = {}
  for n in names:
    with open(os.path.join(workdir, n, "config.json"), encoding="utf-8") as f:
      flat[n] = sweep_points.flatten(json.load(f))
  keys = sorted({k for f in flat.values() for k in f})
  varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1]
  points = []
  for i, n in enumerate(names):
    overrides = {k: flat[n].get(k) for k in varying}
    points.append({"index": i, "name": n, "group": sweep_points.group_name(overrides),
                   "overrides": overrides})
  return "(no sweep.json: overrides are the config keys that differ)", points


def wall_time(run: Run) -> float | None:
  """Training wall time summed over restarts (`train/wall_time` restarts at 0 on resume)."""
  _, values = run.series("train/wall_time")
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return None
  total = sum(a for a, b in zip(values, values[1:]) if b < a)  # the last value before a restart
  return total + values[-1]


def point_figures(workdir: str, point: dict) -> dict[str, Any]:
  """Everything the tables show about one point, as numbers (None where unknown)."""
  d = os.path.join(workdir, point["name"])
  run = load_run(d, point["name"])
  f = {"index": point["index"], "name": point["name"], "group": point["group"],
       "overrides": point["overrides"], "status": sweep_points.status(d), "run": run,
       "num_levels": run.num_levels}
  f["steps"] = run.rows[-1]["step"] if run.rows else None
  f["num_steps"] = run.config.get("train", {}).get("num_steps")
  f["batch_size"] = run.config.get("train", {}).get("batch_size")
  for name in ("eval/bpd", "eval_train/bpd", "gap/bpd"):
    f[name] = run.last(name)[1]
  steps, values = run.series("eval/bpd")
  best = min(((v, s) for s, v in zip(steps, values) if math.isfinite(v)), default=(None, None))
  f["eval/bpd_best"], f["eval/bpd_best_step"] = best
  results_path = os.path.join(d, "eval", "results.json")
  f["eval/iw_bpd"] = f["iw_checkpoint_step"] = None
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as fh:
      results = json.load(fh)
    f["eval/iw_bpd"] = results.get("metrics", {}).get("eval/iw_bpd")
    for name in ("gap/refine/encoder_bpd", "gap/refine/decoder_bpd"):  # at that checkpoint
      f[name] = results.get("metrics", {}).get(name)
    f["iw_checkpoint_step"] = results.get("checkpoint_step")
  for name in ("gap/refine/encoder_bpd", "gap/refine/decoder_bpd"):
    if f.get(name) is None:  # no closing evaluation's split: the last training evaluation's
      f[name] = run.last(name)[1]
  for l in range(1, run.num_levels + 1):
    for split in ("eval", "gap"):
      f[metric(split, "kl", level=l)] = run.last(metric(split, "kl", level=l))[1]
  verdicts = verdict.explain(run.rows, run.num_levels, verdict.settings(run.config))
  f["overfit_levels"] = [l for l, v in verdicts.items() if v.flagged]
  flops_path = os.path.join(d, sweep_points.FLOPS_FILE)
  f["flops_per_step"] = None
  if os.path.exists(flops_path):
    with open(flops_path, encoding="utf-8") as fh:
      f["flops_per_step"] = json.load(fh).get("flops_per_step")
  f["wall_time_s"] = wall_time(run)
  return f


def stats(values: Sequence) -> tuple[float | None, float | None, int]:
  """Mean, sample standard deviation (None for n < 2) and n of the finite values."""
  v = [x for x in values if finite(x)]
  if not v:
    return None, None, 0
  return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def groups(figures: list[dict]) -> dict[str, list[dict]]:
  """`point_figures` of every point by group (points differing only in `seed`), in order."""
  out = {}
  for f in figures:
    out.setdefault(f["group"], []).append(f)
  return out
