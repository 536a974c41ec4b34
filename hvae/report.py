"""`launch.py --mode=report`: plots, the latest image grids and report.md for one or more runs.

  python launch.py --mode=report --workdir=runs/a [--workdir=runs/b ...]

Each workdir gets WORKDIR/report/ (DESIGN §7 "Workdir"): PNG plots of the metrics over steps,
the newest image grid of every kind in WORKDIR/images/ (copied to report/images/), and report.md
with the final figures per level and the overfitting verdict (hvae/verdict.py). With several
workdirs, a side-by-side comparison goes to FIRST/report/compare/ (compare.md and its plots).

Reads only metrics.jsonl, config.json and images/*.png, with numpy and matplotlib (Agg, through
`matplotlib.figure.Figure`, no pyplot): no JAX, no TensorFlow, so it runs on a laptop, on runs
still in progress (no DONE) and on a metrics.jsonl whose last line is cut short. Metrics a run
does not log (a deterministic run has no levels; older runs no swaps) are left out.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any

from absl import logging
from matplotlib.figure import Figure

from hvae import metrics_file, verdict
from hvae.errors import MissingPathError

REPORT_DIR = "report"
COMPARE_DIR = "compare"
_IMAGE_RE = re.compile(r"^(?P<prefix>.*?)step_(?P<step>\d+)\.png$")
_LEVEL_RE = re.compile(r"/level_(\d+)$")
SPLITS = ("train", "eval_train", "eval")
_STYLE = dict(train=dict(color="0.6", lw=1), eval_train=dict(color="C0"), eval=dict(color="C3"))


read_rows = metrics_file.read_metrics  # the JAX-free reader (hvae/metrics_file.py)


@dataclasses.dataclass
class Run:
  """What the report knows about one workdir."""

  workdir: str
  name: str
  config: dict  # config.json as plain dicts and lists ({} when missing)
  rows: list[dict]
  num_levels: int  # 0 for a deterministic run
  done: bool

  def last(self, name: str) -> tuple[int | None, Any]:
    """(step, value) of the newest row holding `name`; (None, None) when never logged."""
    for row in reversed(self.rows):
      if name in row:
        return row["step"], row[name]
    return None, None

  def series(self, name: str) -> tuple[list[int], list[float]]:
    """Steps and values (non-finite as NaN) of every row holding `name`."""
    pairs = [(r["step"], math.nan if r[name] is None else r[name]) for r in self.rows if name in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]

  def has(self, name: str) -> bool:
    return any(name in r for r in self.rows)


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a workdir's config.json and metrics.jsonl (either may be missing).

  Args:
    workdir: the run's directory.
    name: a display name (default: the directory's base name).

  Returns:
    The Run. Its level count comes from config.json (0 for model.kind = deterministic), else from
    the largest `level_l` among the logged metric names.
  """
  config, path = {}, os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  rows = read_rows(workdir)
  model = config.get("model", {})
  if model.get("kind") == "deterministic":
    num_levels = 0
  elif "num_levels" in model:
    num_levels = int(model["num_levels"])
  else:
    found = [int(m.group(1)) for r in rows for k in r if (m := _LEVEL_RE.search(k))]
    num_levels = max(found, default=0)
  name = name or os.path.basename(os.path.normpath(workdir))
  return Run(workdir, name, config, rows, num_levels, os.path.exists(os.path.join(workdir, "DONE")))


def resolution(run: Run, level: int) -> str:
  """Level `level`'s latent shape in words: "16×16×8", or "vector (64)" for the top level."""
  model = run.config.get("model", {})
  if level == run.num_levels:
    dim = model.get("top_latent_dim")
    return f"vector ({dim})" if dim is not None else "vector"
  r = run.config.get("data", {}).get("image_size", 64) // 2**level
  channels = list(model.get("latent_channels", []))
  c = "" if not channels else f"×{channels[0 if len(channels) == 1 else level - 1]}"
  return f"{r}×{r}{c}"


def latest_images(workdir: str) -> dict[str, str]:
  """The newest `PREFIXstep_N.png` of every prefix in WORKDIR/images/ ("" for the fill-in grids).

  Args:
    workdir: the run's directory.

  Returns:
    prefix -> file name, in prefix order.
  """
  directory = os.path.join(workdir, "images")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  newest = {}  # later steps overwrite earlier ones
  for m in sorted(filter(None, map(_IMAGE_RE.match, names)), key=lambda m: int(m.group("step"))):
    newest[m.group("prefix")] = m.group(0)
  return dict(sorted(newest.items()))


# --- plots -------------------------------------------------------------------------------------


def _plot(path: str, title: str, ylabel: str, panels: Sequence[tuple[str, list]],
          zero_line: bool = False) -> str | None:
  """Saves one figure of (panel title, curves) panels; a curve is (run, metric, label, style).

  Returns:
    The file's base name, or None (nothing saved) when no curve of any panel was ever logged.
  """
  if not panels:
    return None
  cols = min(len(panels), 3)
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.4), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
  fig.suptitle(textwrap.fill(title, width=int(11 * 4.5 * cols)))  # ~11 characters per inch
  drawn = False
  for ax, (panel_title, curves) in zip(axes, panels):
    for run, name, label, style in curves:
      steps, values = run.series(name)
      if steps:
        ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None, **style)
        drawn = True
    if zero_line:
      ax.axhline(0, color="k", lw=0.5)
    ax.set(title=panel_title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  if not drawn:
    return None
  fig.savefig(path, dpi=90)
  return os.path.basename(path)


def _run_plots(run: Run, out: str) -> list[str]:
  """Writes the per-run plots into `out`; returns the file names written."""
  levels = range(1, run.num_levels + 1)
  splits = lambda kind: [(f"level {l}", [(run, f"{s}/{kind}/level_{l}", s, _STYLE[s])  # noqa: E731
                                         for s in SPLITS]) for l in levels]
  bpd = [(run, f"{s}/bpd", f"{s}/bpd", _STYLE[s]) for s in SPLITS]
  bpd.append((run, "eval/iw_bpd", "eval/iw_bpd", dict(color="C2", ls="--")))
  gap = [(run, f"gap/kl/level_{l}", f"level {l}", dict(color=f"C{l - 1}")) for l in levels]
  quantiles = [(f"level {l}", [(run, f"eval/kl/level_{l}", "mean", dict(color="k"))] + [
      (run, f"eval/kl_{q}/level_{l}", q, dict(color=f"C{i}", ls="--"))
      for i, q in enumerate(("p50", "p90", "p99", "max"))]) for l in levels]
  path = lambda name: os.path.join(out, name)  # noqa: E731
  files = [
      _plot(path("bpd.png"), f"{run.name}: negative ELBO", "bits per missing dim",
            [("bpd", bpd)]),
      _plot(path("kl.png"), f"{run.name}: KL per level", "nats / image", splits("kl")),
      _plot(path("gap.png"), f"{run.name}: held-out minus train-split KL", "nats / image",
            [("gap/kl/level_l", gap)] if gap else [], zero_line=True),
      _plot(path("swap.png"), f"{run.name}: posterior→prior swap",
            "nats (drop in recon. log-lik.)", splits("swap")),
      _plot(path("active_units.png"), f"{run.name}: active units", "fraction",
            splits("active_units")),
      _plot(path("kl_quantiles.png"), f"{run.name}: held-out per-example KL", "nats / image",
            quantiles)]
  return [f for f in files if f]


# --- report.md ---------------------------------------------------------------------------------


def _fmt(run: Run, name: str, digits: int = 3) -> str:
  _, value = run.last(name)
  if value is None:
    return "n/a" if run.has(name) else "—"  # logged but non-finite | never logged
  return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _status(run: Run) -> str:
  total = run.config.get("train", {}).get("num_steps")
  state = (f" of {total}" if total else "") + (", done" if run.done else ", in progress (no DONE)")
  return f"last logged step {run.rows[-1]['step']}{state}" if run.rows else "no metrics yet"


def _level_rows(run: Run, verdicts: dict[int, verdict.LevelVerdict]) -> tuple[list, list]:
  """Header and rows of the per-level table; optional columns only when logged."""
  cols = [("kl", "eval/kl/level_{l}", 2), ("kl_bpd", "eval/kl_bpd/level_{l}", 4),
          ("kl_per_dim", "eval/kl_per_dim/level_{l}", 4),
          ("train-split kl", "eval_train/kl/level_{l}", 2), ("gap", "gap/kl/level_{l}", 2)]
  optional = [(q, f"eval/kl_{q}/level_{{l}}", 2) for q in ("p50", "p90", "p99", "max")] + [
      ("active units", "eval/active_units/level_{l}", 3),
      ("train-split active", "eval_train/active_units/level_{l}", 3),
      ("swap", "eval/swap/level_{l}", 2), ("train-split swap", "eval_train/swap/level_{l}", 2)]
  levels = range(1, run.num_levels + 1)
  cols += [c for c in optional if any(run.has(c[1].format(l=l)) for l in levels)]
  header = ["level", "resolution"] + [c[0] for c in cols] + ["overfit"]
  rows = [[str(l), resolution(run, l)] + [_fmt(run, c[1].format(l=l), c[2]) for c in cols]
          + ["**yes**" if verdicts[l].flagged else "no"] for l in levels]
  return header, rows


def gap_decomposition(run: Run) -> list[tuple[str, float, float, float]] | None:
  """Where the held-out gap is: [(part, eval, eval_train, gap)] in bits per missing dim.

  Since bpd = recon_bpd + Σ_l kl_bpd/level_l on each split (DESIGN §7), gap/bpd splits exactly
  into the likelihood's gap (`recon`) and each level's KL gap. Uses the newest evaluation row
  that logged both splits; None when there is none, or a part of it is missing or non-finite.
  """
  row = _last_two_split_row(run)
  if row is None:
    return None
  parts = [("recon", "recon_bpd")] + [(f"level {l}", f"kl_bpd/level_{l}")
                                      for l in range(1, run.num_levels + 1)]
  out = []
  for label, name in parts:
    held, train = row.get(f"eval/{name}"), row.get(f"eval_train/{name}")
    if not (finite(held) and finite(train)):
      return None
    out.append((label, held, train, held - train))
  return out


def _last_two_split_row(run: Run) -> dict | None:
  """The newest metrics row holding both `eval/bpd` and `eval_train/bpd`."""
  return next((r for r in reversed(run.rows) if "eval/bpd" in r and "eval_train/bpd" in r), None)


def finite(v) -> bool:
  """A logged number that is not NaN or inf (`null` in metrics.jsonl reads as None)."""
  return isinstance(v, int | float) and math.isfinite(v)


def _gap_lines(run: Run) -> list[str]:
  """The gap decomposition as markdown; shares only when the gap is positive."""
  parts = gap_decomposition(run)
  if not parts or len(parts) < 2:
    return []
  total = sum(p[3] for p in parts)
  share = lambda x: f"{100 * x / total:.1f} %" if total > 0 else "—"  # noqa: E731
  rows = [[label, f"{held:.4f}", f"{train:.4f}", f"{gap:+.4f}", share(gap)]
          for label, held, train, gap in parts]
  held, train = sum(p[1] for p in parts), sum(p[2] for p in parts)
  rows.append(["sum of the parts", f"{held:.4f}", f"{train:.4f}", f"{total:+.4f}", share(total)])
  row = _last_two_split_row(run)
  logged = (row["eval/bpd"], row["eval_train/bpd"])
  rows.append(["logged `bpd`", *(f"{v:.4f}" if finite(v) else "n/a" for v in logged),
               f"{logged[0] - logged[1]:+.4f}" if all(map(finite, logged)) else "n/a", ""])
  lines = (["## Where the held-out gap is (bits per missing dim)", ""]
           + _table(["part", "eval", "eval_train", "gap", "share of gap"], rows) + [""])
  if not all(map(finite, logged)) or max(abs(held - logged[0]), abs(train - logged[1])) > 1e-4:
    lines += ["**The parts do not add up to the logged bpd** (bpd = recon_bpd + Σ kl_bpd is "
              "broken in this run's metrics): read the shares with care.", ""]
  levels = sum(p[3] for p in parts[1:])
  lines += [f"The latent levels' KL account for {levels:+.4f} bits/dim ({share(levels)}) of the "
            "gap; the rest is the likelihood's (`recon_bpd`: what the decoder fails to predict on "
            "new images given the latents). A remedy on a level acts on that level's part "
            "directly, and on the likelihood's only through what the level passes down.", ""]
  return lines


def command_of(workdir: str) -> tuple[str | None, list[str]]:
  """The experiment file and config overrides the run was started with, from run_info.json.

  Args:
    workdir: the run's directory.

  Returns:
    (`--config` value such as "experiments/quickstart.py:deterministic", or None when unknown;
    the `--config.a.b=VALUE` overrides of that command line).
  """
  try:
    with open(os.path.join(workdir, "run_info.json"), encoding="utf-8") as f:
      argv = json.load(f).get("command") or []
  except (OSError, ValueError, AttributeError):
    return None, []
  argv = [str(a) for a in argv]
  experiment, overrides = None, []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      experiment = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      experiment = argv[i + 1]
    elif arg.startswith("--config."):
      overrides.append(arg)
  return experiment, overrides


def title(run: Run) -> str:
  """The report's title: the experiment file (when run_info.json names it) and the workdir.

  e.g. "experiments/quickstart.py:deterministic — runs/quickstart_det".
  """
  workdir = os.path.normpath(run.workdir)
  if workdir in (".", ".."):
    workdir = os.path.abspath(workdir)
  experiment, _ = command_of(run.workdir)
  return f"{experiment} — {workdir}" if experiment else workdir


def _markdown(run: Run, plots: list[str], images: dict[str, str], s: verdict.Settings,
              verdicts: dict[int, verdict.LevelVerdict]) -> str:
  model = run.config.get("model", {})
  now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  _, overrides = command_of(run.workdir)
  lines = [f"# Report: {title(run)}", "",
           f"`{os.path.abspath(run.workdir)}` — model.kind {model.get('kind', '?')}, "
           f"{run.num_levels} latent level(s); {_status(run)}. Written {now}.", ""]
  if overrides:
    lines += ["Overrides: " + " ".join(f"`{o}`" for o in overrides), ""]
  eval_step, _ = run.last("eval/bpd")
  at = f"evaluation at step {eval_step}" if eval_step is not None else "no evaluation yet"
  lines += [f"## Final figures (bits per missing dim; {at})", ""]
  split_rows = [[s_] + [_fmt(run, f"{s_}/{n}", 4) for n in ("bpd", "recon_bpd")] for s_ in SPLITS]
  split_rows.append(["gap"] + [_fmt(run, "gap/bpd", 4), "—"])
  if run.has("eval/iw_bpd"):
    split_rows.append(["eval (importance-weighted)", _fmt(run, "eval/iw_bpd", 4), "—"])
  lines += _table(["split", "bpd", "recon_bpd"], split_rows) + [""]
  lines += _gap_lines(run)
  if run.num_levels:
    lines += ["## Per level (held-out `eval/` unless named; KL in nats per image)", ""]
    lines += _table(*_level_rows(run, verdicts)) + [""]
    lines += ["## Verdict", ""] + verdict.markdown(verdicts, s) + [""]
  else:
    lines += ["No latent levels (deterministic model): no per-level figures or verdict.", ""]
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  if images:
    lines += ["## Latest images", ""]
    lines += [f"**{name}**\n\n![{name}](images/{name})\n" for name in images.values()]
  return "\n".join(lines)


def _remove_pngs(directory: str, pattern: re.Pattern) -> None:
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if pattern.match(name):
        os.remove(os.path.join(directory, name))


def write_report(workdir: str, output: str | None = None) -> str:
  """Writes the report of one run.

  Args:
    workdir: the run's directory.
    output: where to write (default WORKDIR/report). Existing report/images/*.png are replaced.

  Returns:
    The report directory (holding report.md, the plots and images/).
  """
  run = load_run(workdir)
  out = output or os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  plots = _run_plots(run, out)
  image_dir = os.path.join(out, "images")
  _remove_pngs(image_dir, _IMAGE_RE)  # an older report's copies
  images = latest_images(workdir)
  for name in images.values():
    os.makedirs(image_dir, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, "images", name), os.path.join(image_dir, name))
  s = verdict.settings(run.config)
  verdicts = verdict.explain(run.rows, run.num_levels, s)
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(_markdown(run, plots, images, s, verdicts))
  logging.info("Report of %s: %s", workdir, out)
  return out


def _names(workdirs: Sequence[str]) -> list[str]:
  """Base names, or parent/base where base names collide."""
  bases = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [b if bases.count(b) == 1 else os.path.join(
      os.path.basename(os.path.dirname(os.path.normpath(w))), b) for b, w in zip(bases, workdirs)]


def write_comparison(workdirs: Sequence[str], output: str) -> str:
  """Writes a side-by-side comparison of several runs: compare.md, plots and latest grids.

  Args:
    workdirs: the runs' directories, in the order of the table's rows.
    output: the directory to write into (launch.py uses FIRST/report/compare).

  Returns:
    `output`.
  """
  runs = [load_run(w, n) for w, n in zip(workdirs, _names(workdirs))]
  os.makedirs(output, exist_ok=True)
  colour = {r.name: dict(color=f"C{i % 10}") for i, r in enumerate(runs)}
  pair = lambda name: [c for r in runs for c in (  # noqa: E731  held-out solid, train dashed
      (r, f"eval/{name}", r.name, colour[r.name]),
      (r, f"eval_train/{name}", None, dict(colour[r.name], ls="--")))]
  levels = range(1, max(r.num_levels for r in runs) + 1)
  plots = [
      _plot(os.path.join(output, "compare_bpd.png"), "held-out (solid) and train-split "
            "(dashed) negative ELBO", "bits per missing dim", [("bpd", pair("bpd"))]),
      _plot(os.path.join(output, "compare_kl.png"), "held-out (solid) and train-split (dashed) "
            "KL", "nats / image", [(f"level {l}", pair(f"kl/level_{l}")) for l in levels]),
      _plot(os.path.join(output, "compare_gap.png"), "held-out minus train-split KL",
            "nats / image", [(f"level {l}", [(r, f"gap/kl/level_{l}", r.name, colour[r.name])
                                             for r in runs]) for l in levels], zero_line=True)]
  plots = [p for p in plots if p]
  flags = {r.name: verdict.explain(r.rows, r.num_levels, verdict.settings(r.config)) for r in runs}
  header = ["run", "kind", "levels", "status", "train/bpd", "eval_train/bpd", "eval/bpd",
            "gap/bpd", "overfitting levels"]
  rows = [[r.name, r.config.get("model", {}).get("kind", "?"), str(r.num_levels), _status(r)]
          + [_fmt(r, n, 4) for n in ("train/bpd", "eval_train/bpd", "eval/bpd", "gap/bpd")]
          + [", ".join(str(l) for l, v in flags[r.name].items() if v.flagged) or "none"]
          for r in runs]
  lines = ["# Comparison", ""] + [f"- **{r.name}**: `{os.path.abspath(r.workdir)}`" for r in runs]
  lines += [""] + _table(header, rows) + [""]
  if levels:
    lines += ["Per level: held-out KL / gap (nats per image).", ""]
    lines += _table(["level"] + [r.name for r in runs], [
        [str(l)] + [f"{_fmt(r, f'eval/kl/level_{l}', 2)} / {_fmt(r, f'gap/kl/level_{l}', 2)}"
                    if l <= r.num_levels else "—" for r in runs] for l in levels]) + [""]
  lines += [f"![{p}]({p})" for p in plots] + [""]
  _remove_pngs(output, re.compile(r"^\d+_.*\.png$"))  # an older comparison's grids
  grids = []
  for i, r in enumerate(runs):
    name = latest_images(r.workdir).get("")
    if name:
      copy = f"{i}_{name}"
      shutil.copyfile(os.path.join(r.workdir, "images", name), os.path.join(output, copy))
      grids.append((r.name, name, copy))
  if grids:
    lines += ["## Latest fill-in grids", ""]
    lines += _table([f"{n} ({src})" for n, src, _ in grids], [[f"![]({c})" for *_, c in grids]])
  with open(os.path.join(output, "compare.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  logging.info("Comparison of %d runs: %s", len(runs), output)
  return output


def main(workdirs: Sequence[str]) -> list[str]:
  """What `launch.py --mode=report` does: every run's report, then a comparison if several.

  A sweep directory (hvae/sweep_report.py: `sweep.json`, or run subdirectories and no run of its
  own) gets the sweep's comparison table instead.

  Args:
    workdirs: one or more run or sweep directories.

  Returns:
    The directories written (sweeps' reports, each run's report, then the comparison's if any).
  """
  from hvae import sweep_report  # imported here: it imports this module

  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    raise MissingPathError(f"no such workdir: {', '.join(missing)}")
  sweeps = [w for w in workdirs if sweep_report.is_sweep_dir(w)]
  runs = [w for w in workdirs if w not in sweeps]
  files = ("config.json", metrics_file.METRICS_FILE)
  empty = [w for w in runs if not any(os.path.exists(os.path.join(w, f)) for f in files)]
  if empty:  # without this, an empty folder would be reported as a "deterministic model"
    raise MissingPathError(
        f"not a training run (no {' or '.join(files)}): {', '.join(empty)}; give the --workdir "
        "of a run (or of a sweep), or train into it first")
  out = [write_report(w) for w in runs]
  if len(runs) > 1:
    out.append(write_comparison(runs, os.path.join(out[0], COMPARE_DIR)))
  return [sweep_report.write(w) for w in sweeps] + out
