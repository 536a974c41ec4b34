"""`launch.py --mode=report --workdir=SWEEP_DIR`: one comparison table of a sweep's points.

  python launch.py --mode=report --workdir=runs/ablate_levels_cpu

A sweep directory holds `sweep.json` (written by `launch.py --sweep`, see hvae/sweep_points.py)
or, for sweeps run some other way, subdirectories with a `config.json` each (the overrides are
then the config keys that differ between them). SWEEP_DIR/report/ gets

* `sweep.md` — per point: its overrides, status, steps, batch, final and best held-out
  `eval/bpd`, `eval/iw_bpd` (the point's eval/results.json), `gap/bpd`, per-level held-out KL and
  gap, the levels hvae/verdict.py flags, FLOPs per train step (flops.json) and training wall time;
  then the same per group of points differing only in `seed`: mean ± sample std (n);
* `sweep.csv` (one row per point, raw numbers, one `override:KEY` column per swept key) and
  `sweep_groups.csv` (`METRIC_mean`, `METRIC_std`, `n` per group), for a paper's own tables;
* `sweep_bpd.png` (held-out bpd per group: mean ± std and every seed), `sweep_curves.png`
  (`eval/bpd` over steps, one colour per group) and `sweep_levels.png` (held-out KL and gap per
  level and group).

Reads files only, like hvae/report.py: the numbers come from hvae/sweep_results.py (which reads
the runs with hvae/metrics_file.py), the tables and plots from hvae/figures.py; no JAX.
`is_sweep_dir` is sweep_results' (re-exported here for hvae/report.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from absl import logging
from matplotlib.figure import Figure

from hvae import sweep_points, sweep_results
from hvae.figures import REPORT_DIR, line_plot, markdown_table
from hvae.metric_names import name as metric
from hvae.metrics_file import finite
from hvae.sweep_results import is_sweep_dir  # noqa: F401  (re-exported: hvae/report.py)

OUT_FILES = ("sweep.md", "sweep.csv", "sweep_groups.csv")
# Numeric columns of both tables: (key, markdown header, digits).
_METRICS = [("eval/bpd", "eval/bpd final", 4), ("eval/bpd_best", "eval/bpd best", 4),
            ("eval/iw_bpd", "eval/iw_bpd", 4), ("eval_train/bpd", "eval_train/bpd", 4),
            ("gap/bpd", "gap/bpd", 4),
            # The gap's encoder and decoder/prior parts (hvae/amortisation.py), when measured.
            ("gap/refine/encoder_bpd", "gap: encoder", 4),
            ("gap/refine/decoder_bpd", "gap: decoder/prior", 4)]


def _num(v, digits: int = 4) -> str:
  if not finite(v):
    return "—"
  return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"


def _pm(values: Sequence, digits: int = 4) -> str:
  mean, std, n = sweep_results.stats(values)
  if not n:
    return "—"
  return _num(mean, digits) + (f" ± {_num(std, digits)}" if std is not None else "")


def _overrides_text(overrides: dict, drop_seed: bool = False) -> str:
  items = [(k, v) for k, v in sorted(overrides.items()) if not (drop_seed and k == "seed")]
  return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in items) or "(none)"


def _markdown(workdir: str, experiment: str, figures: list[dict], levels: range,
              plots: list[str]) -> str:
  lines = [f"# Sweep: {os.path.basename(os.path.normpath(workdir))}", "",
           f"`{os.path.abspath(workdir)}` — `{experiment}`, {len(figures)} point(s). Bits per "
           "missing dim; KL and gap (held-out minus train-split KL) in nats per image, at the "
           "last evaluation; `eval/bpd best` is the lowest held-out value logged (at step); "
           "`eval/iw_bpd` is the point's `eval/results.json` (checkpoint "
           f"`{sweep_points.EVAL_CHECKPOINT}`, at step). FLOPs: XLA cost analysis of one train "
           "step on the global batch. Wall time: the training loop (with its evaluations), "
           "summed over restarts.", ""]
  level_cols = [f"L{l} kl / gap" for l in levels]
  header = (["#", "point", "overrides", "status", "steps", "batch"] + [m[1] for m in _METRICS]
            + level_cols + ["overfit levels", "GFLOPs/step", "wall min"])
  rows = []
  for f in figures:
    steps = f"{f['steps']}" + (f" of {f['num_steps']}" if f["num_steps"] else "") \
        if f["steps"] is not None else "—"
    cells = [_num(f["eval/bpd"]),
             _num(f["eval/bpd_best"]) + (f" ({f['eval/bpd_best_step']})"
                                         if f["eval/bpd_best"] is not None else ""),
             _num(f["eval/iw_bpd"]) + (f" ({f['iw_checkpoint_step']})"
                                       if f["eval/iw_bpd"] is not None else ""),
             _num(f["eval_train/bpd"]), _num(f["gap/bpd"])]
    per_level = [f"{_num(f.get(metric('eval', 'kl', level=l)), 2)} / "
                 f"{_num(f.get(metric('gap', 'kl', level=l)), 2)}"
                 if l <= f["num_levels"] else "—" for l in levels]
    rows.append([str(f["index"]), f["name"], _overrides_text(f["overrides"]), f["status"], steps,
                 str(f["batch_size"] or "—")] + cells + per_level
                + [", ".join(map(str, f["overfit_levels"])) or "none",
                   _num((f["flops_per_step"] or math.nan) / 1e9, 3),
                   _num((f["wall_time_s"] or math.nan) / 60, 1)])
  lines += ["## Points", ""] + markdown_table(header, rows) + [""]

  groups = sweep_results.groups(figures)
  header = (["group", "overrides (seed aside)", "n", "seeds"] + [m[1] for m in _METRICS]
            + [f"L{l} kl" for l in levels] + [f"L{l} gap" for l in levels]
            + ["overfit: level (seeds)", "GFLOPs/step", "wall min"])
  rows = []
  for g, fs in groups.items():
    seeds = ", ".join(str(f["overrides"].get("seed", "—")) for f in fs)
    flagged = {}
    for f in fs:
      for l in f["overfit_levels"]:
        flagged[l] = flagged.get(l, 0) + 1
    n = sum(finite(f["eval/bpd"]) for f in fs)  # points with an evaluation so far
    rows.append(
        [g, _overrides_text(fs[0]["overrides"], drop_seed=True),
         str(n) if n == len(fs) else f"{n} of {len(fs)}", seeds]
        + [_pm([f[m] for f in fs], d) for m, _, d in _METRICS]
        + [_pm([f.get(metric("eval", "kl", level=l)) for f in fs], 2) for l in levels]
        + [_pm([f.get(metric("gap", "kl", level=l)) for f in fs], 2) for l in levels]
        + [", ".join(f"{l} ({c}/{len(fs)})" for l, c in sorted(flagged.items())) or "none",
           _pm([(f["flops_per_step"] or math.nan) / 1e9 for f in fs], 3),
           _pm([(f["wall_time_s"] or math.nan) / 60 for f in fs], 1)])
  lines += ["## Groups (points differing only in `seed`: mean ± sample std over n)", ""]
  lines += markdown_table(header, rows) + [""]
  lines += [f"![{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)


def _csv_rows(figures: list[dict], levels: range) -> tuple[list[dict], list[dict]]:
  keys = sorted({k for f in figures for k in f["overrides"]})
  metric_names = ([m[0] for m in _METRICS] + [metric("eval", "kl", level=l) for l in levels]
                  + [metric("gap", "kl", level=l) for l in levels]
                  + ["flops_per_step", "wall_time_s"])
  point_rows = []
  for f in figures:
    row = {"index": f["index"], "name": f["name"], "group": f["group"], "status": f["status"],
           "steps": f["steps"], "batch_size": f["batch_size"]}
    row.update({f"override:{k}": json.dumps(f["overrides"][k]) if k in f["overrides"] else ""
                for k in keys})
    row.update({m: f.get(m) for m in metric_names})
    row.update({"eval/bpd_best_step": f["eval/bpd_best_step"],
                "iw_checkpoint_step": f["iw_checkpoint_step"],
                "overfit_levels": " ".join(map(str, f["overfit_levels"]))})
    point_rows.append(row)
  group_rows = []
  for g, fs in sweep_results.groups(figures).items():
    row = {"group": g, "n": len(fs)}
    row.update({f"override:{k}": json.dumps(fs[0]["overrides"][k])
                if k in fs[0]["overrides"] else "" for k in keys if k != "seed"})
    for m in metric_names:
      mean, std, n = sweep_results.stats([f.get(m) for f in fs])
      row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n})
    group_rows.append(row)
  return point_rows, group_rows


def _write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def _dot_plot(path: str, figures: list[dict]) -> str | None:
  """Held-out bpd per group: mean ± std (error bar) and every seed (dots), three metrics."""
  groups = sweep_results.groups(figures)
  metrics = [("eval/bpd", "final eval/bpd"), ("eval/bpd_best", "best eval/bpd"),
             ("eval/iw_bpd", "eval/iw_bpd")]
  metrics = [m for m in metrics if any(finite(f[m[0]]) for f in figures)]
  if not metrics:
    return None
  fig = Figure(figsize=(max(5.0, 0.9 * len(groups) + 2), 4.2), layout="constrained")
  ax = fig.subplots()
  width = 0.8 / len(metrics)
  for j, (m, label) in enumerate(metrics):
    for i, fs in enumerate(groups.values()):
      x = i - 0.4 + width * (j + 0.5)
      values = [f[m] for f in fs if finite(f[m])]
      mean, std, n = sweep_results.stats(values)
      if not n:
        continue
      ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color=f"C{j}", capsize=4, ms=6,
                  label=label if i == 0 else None)
      ax.plot([x] * n, values, ".", color=f"C{j}", alpha=0.4, ms=4)
  ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
  ax.set(ylabel="bits per missing dim", xlim=(-0.5, len(groups) - 0.5),
         title="held-out bpd per group\n(mean ± std over seeds; dots: seeds)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=90)
  return os.path.basename(path)


def _levels_plot(path: str, figures: list[dict], levels: range) -> str | None:
  if not levels:
    return None
  fig = Figure(figsize=(10, 3.8), layout="constrained")
  axes = fig.subplots(1, 2)
  drawn = False
  for i, (g, fs) in enumerate(sweep_results.groups(figures).items()):
    for ax, split in zip(axes, ("eval", "gap")):
      stats = [(l, *sweep_results.stats([f.get(metric(split, "kl", level=l)) for f in fs]))
               for l in levels]
      stats = [s for s in stats if s[3]]
      if stats:
        ax.errorbar([s[0] for s in stats], [s[1] for s in stats],
                    yerr=[s[2] or 0.0 for s in stats], marker="o", capsize=3, label=g,
                    color=f"C{i % 10}")
        drawn = True
  for ax, title in zip(axes, ("held-out KL per level", "held-out minus train-split KL")):
    ax.set(title=title, xlabel="level (1 = 32×32)", ylabel="nats / image", xticks=list(levels))
    ax.grid(alpha=0.3)
  axes[1].axhline(0, color="k", lw=0.5)
  if not drawn:
    return None
  axes[0].legend(fontsize=7)
  fig.savefig(path, dpi=90)
  return os.path.basename(path)


def write(workdir: str, output: str | None = None) -> str:
  """Writes the sweep's comparison (markdown, CSV, plots).

  Args:
    workdir: the sweep's directory.
    output: where to write (default WORKDIR/report).

  Returns:
    The output directory.
  """
  experiment, points = sweep_results.list_points(workdir)
  out = output or os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  figures = [sweep_results.point_figures(workdir, p) for p in points]
  levels = range(1, max((f["num_levels"] for f in figures), default=0) + 1)
  colour = {g: dict(color=f"C{i % 10}") for i, g in enumerate(sweep_results.groups(figures))}
  labelled = {f["group"]: f["name"] for f in reversed(figures)}  # one legend entry per group
  curves = [(f["run"], "eval/bpd", f["group"] if labelled[f["group"]] == f["name"] else None,
             colour[f["group"]]) for f in figures]
  plots = [_dot_plot(os.path.join(out, "sweep_bpd.png"), figures),
           line_plot(os.path.join(out, "sweep_curves.png"),
                        "held-out negative ELBO (one colour per group)", "bits per missing dim",
                        [("eval/bpd", curves)]),
           _levels_plot(os.path.join(out, "sweep_levels.png"), figures, levels)]
  plots = [p for p in plots if p]
  with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as f:
    f.write(_markdown(workdir, experiment, figures, levels, plots))
  point_rows, group_rows = _csv_rows(figures, levels)
  _write_csv(os.path.join(out, "sweep.csv"), point_rows)
  _write_csv(os.path.join(out, "sweep_groups.csv"), group_rows)
  logging.info("Sweep report of %d points: %s", len(figures), out)
  return out
