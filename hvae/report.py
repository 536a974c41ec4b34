"""`launch.py --mode=report`: plots, the latest image grids and report.md for one or more runs.

Why one file past ~350 lines: a run's report and the side-by-side comparison of runs share
its formatting (`_fmt`, `_status`, `latest_images`); the sweep table is hvae/sweep_report.py,
the drawing hvae/figures.py.

  python launch.py --mode=report --workdir=runs/a [--workdir=runs/b ...]

Each workdir gets WORKDIR/report/ (docs/design.md §7 "Workdir"): PNG plots of the metrics over
steps, the newest image grid of every kind in WORKDIR/images/ (copied to report/images/), and
report.md with the final figures per level and the overfitting verdict (hvae/verdict.py). With
several workdirs, a side-by-side comparison goes to FIRST/report/compare/ (compare.md and its
plots).

Reads only metrics.jsonl, config.json and images/*.png, with numpy and matplotlib (Agg, through
`matplotlib.figure.Figure`, no pyplot): no JAX, no TensorFlow, so it runs on a laptop, on runs
still in progress (no DONE) and on a metrics.jsonl whose last line is cut short. Metrics a run
does not log (a deterministic run has no levels; older runs no swaps) are left out.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Sequence

from absl import logging

from hvae import metrics_file, split_report, sweep_report, verdict
from hvae.errors import MissingPathError
from hvae.figures import REPORT_DIR, line_plot, markdown_table
from hvae.metric_names import name as metric
from hvae.metrics_file import Run, finite, load_run  # noqa: F401  (re-exported for callers)

COMPARE_DIR = "compare"
_IMAGE_RE = re.compile(r"^(?P<prefix>.*?)step_(?P<step>\d+)\.png$")
SPLITS = ("train", "eval_train", "eval")
_STYLE = dict(train=dict(color="0.6", lw=1), eval_train=dict(color="C0"), eval=dict(color="C3"))


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


def _run_plots(run: Run, out: str) -> list[str]:
  """Writes the per-run plots into `out`; returns the file names written."""
  levels = range(1, run.num_levels + 1)
  splits = lambda kind: [(f"level {l}", [(run, metric(s, kind, level=l), s, _STYLE[s])  # noqa: E731
                                         for s in SPLITS]) for l in levels]
  bpd = [(run, metric(s, "bpd"), metric(s, "bpd"), _STYLE[s]) for s in SPLITS]
  bpd.append((run, "eval/iw_bpd", "eval/iw_bpd", dict(color="C2", ls="--")))
  gap = [(run, metric("gap", "kl", level=l), f"level {l}", dict(color=f"C{l - 1}"))
         for l in levels]
  quantiles = [(f"level {l}", [(run, metric("eval", "kl", level=l), "mean", dict(color="k"))] + [
      (run, metric("eval", f"kl_{q}", level=l), q, dict(color=f"C{i}", ls="--"))
      for i, q in enumerate(("p50", "p90", "p99", "max"))]) for l in levels]
  path = lambda name: os.path.join(out, name)  # noqa: E731
  files = [
      line_plot(path("bpd.png"), f"{run.name}: negative ELBO", "bits per missing dim",
                [("bpd", bpd)]),
      line_plot(path("kl.png"), f"{run.name}: KL per level", "nats / image", splits("kl")),
      line_plot(path("gap.png"), f"{run.name}: held-out minus train-split KL", "nats / image",
                [("gap/kl/level_l", gap)] if gap else [], zero_line=True),
      line_plot(path("swap.png"), f"{run.name}: posterior→prior swap",
                "nats (drop in recon. log-lik.)", splits("swap")),
      line_plot(path("active_units.png"), f"{run.name}: active units", "fraction",
                splits("active_units")),
      line_plot(path("kl_quantiles.png"), f"{run.name}: held-out per-example KL",
                "nats / image", quantiles)]
  # The encoder/decoder split and the memorisation signal, when eval.refine_steps > 0.
  parts = [(f"level {l}", [
      (run, metric("gap", "refine", "encoder_bpd", level=l), "encoder", dict(color="C3")),
      (run, metric("gap", "refine", "decoder_bpd", level=l), "decoder/prior", dict(color="C0"))])
      for l in levels]
  files += [line_plot(path("encoder_decoder.png"), f"{run.name}: held-out gap per level, "
                      "encoder vs decoder/prior part (refinement)", "bits per missing dim",
                      parts, zero_line=True),
            line_plot(path("mi.png"), f"{run.name}: memorisation I(n; z_l) (at most log N)",
                      "nats", splits("mi"))]
  return [f for f in files if f]


# --- report.md ---------------------------------------------------------------------------------


def _fmt(run: Run, name: str, digits: int = 3) -> str:
  _, value = run.last(name)
  if value is None:
    return "n/a" if run.has(name) else "—"  # logged but non-finite | never logged
  return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def _status(run: Run) -> str:
  total = run.config.get("train", {}).get("num_steps")
  state = (f" of {total}" if total else "") + (", done" if run.done else ", in progress (no DONE)")
  return f"last logged step {run.rows[-1]['step']}{state}" if run.rows else "no metrics yet"


def _level_rows(run: Run, verdicts: dict[int, verdict.LevelVerdict]) -> tuple[list, list]:
  """Header and rows of the per-level table; optional columns only when logged."""
  # (column header, split, quantity, digits)
  cols = [("kl", "eval", "kl", 2), ("kl_bpd", "eval", "kl_bpd", 4),
          ("kl_per_dim", "eval", "kl_per_dim", 4), ("train-split kl", "eval_train", "kl", 2),
          ("gap", "gap", "kl", 2)]
  optional = [(q, "eval", f"kl_{q}", 2) for q in ("p50", "p90", "p99", "max")] + [
      ("active units", "eval", "active_units", 3),
      ("train-split active", "eval_train", "active_units", 3),
      ("swap", "eval", "swap", 2), ("train-split swap", "eval_train", "swap", 2)]
  levels = range(1, run.num_levels + 1)
  cols += [c for c in optional if any(run.has(metric(c[1], c[2], level=l)) for l in levels)]
  header = ["level", "resolution"] + [c[0] for c in cols] + ["overfit"]
  rows = [[str(l), resolution(run, l)] + [_fmt(run, metric(c[1], c[2], level=l), c[3])
                                          for c in cols]
          + ["**yes**" if verdicts[l].flagged else "no"] for l in levels]
  return header, rows


def gap_decomposition(run: Run) -> list[tuple[str, float, float, float]] | None:
  """Where the held-out gap is: [(part, eval, eval_train, gap)] in bits per missing dim.

  Since bpd = recon_bpd + Σ_l kl_bpd/level_l on each split (docs/design.md §2), gap/bpd splits
  exactly into the likelihood's gap (`recon`) and each level's KL gap. Uses the newest evaluation
  row that logged both splits; None when there is none, or a part of it is missing or non-finite.
  """
  row = _last_two_split_row(run)
  if row is None:
    return None
  parts = [("recon", "recon_bpd", None)] + [(f"level {l}", "kl_bpd", l)
                                            for l in range(1, run.num_levels + 1)]
  out = []
  for label, quantity, level in parts:
    held = row.get(metric("eval", quantity, level=level))
    train = row.get(metric("eval_train", quantity, level=level))
    if not (finite(held) and finite(train)):
      return None
    out.append((label, held, train, held - train))
  return out


def _last_two_split_row(run: Run) -> dict | None:
  """The newest metrics row holding both `eval/bpd` and `eval_train/bpd`."""
  return next((r for r in reversed(run.rows) if "eval/bpd" in r and "eval_train/bpd" in r), None)


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
           + markdown_table(["part", "eval", "eval_train", "gap", "share of gap"], rows) + [""])
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
  lines += markdown_table(["split", "bpd", "recon_bpd"], split_rows) + [""]
  lines += _gap_lines(run)
  lines += _split_lines(run)
  if run.num_levels:
    lines += ["## Per level (held-out `eval/` unless named; KL in nats per image)", ""]
    lines += markdown_table(*_level_rows(run, verdicts)) + [""]
    lines += ["## Verdict", ""] + verdict.markdown(verdicts, s) + [""]
  else:
    lines += ["No latent levels (deterministic model): no per-level figures or verdict.", ""]
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  if images:
    lines += ["## Latest images", ""]
    lines += [f"**{name}**\n\n![{name}](images/{name})\n" for name in images.values()]
  return "\n".join(lines)


def split_row(run: Run) -> tuple[dict | None, str]:
  """The newest figures of the encoder/decoder split (hvae/amortisation.py) and where they
  come from: the training evaluations' (eval.refine_steps > 0), else `--mode=eval
  --refine_steps=S`'s in WORKDIR/eval; (None, "") when neither logged them."""
  row = next((r for r in reversed(run.rows) if split_report.KEY in r), None)
  if row is not None:
    return row, f"training evaluation at step {row['step']}"
  rows = metrics_file.read_metrics(os.path.join(run.workdir, "eval"))
  row = next((r for r in reversed(rows) if split_report.KEY in r), None)
  if row is not None:
    return row, f"`--mode=eval --refine_steps`, checkpoint step {row['step']} (WORKDIR/eval)"
  return None, ""


def _split_lines(run: Run) -> list[str]:
  row, source = split_row(run)
  if row is None or not run.num_levels:
    return []
  return split_report.markdown(row, run.num_levels,
                               f"## Encoder or decoder: the held-out gap split by refinement "
                               f"({source})")


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
  verdicts = verdict.explain(run.rows, run.num_levels, s, split_row=split_row(run)[0])
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
  pair = lambda *name, level=None: [c for r in runs for c in (  # noqa: E731  held-out solid
      (r, metric("eval", *name, level=level), r.name, colour[r.name]),
      (r, metric("eval_train", *name, level=level), None, dict(colour[r.name], ls="--")))]
  levels = range(1, max(r.num_levels for r in runs) + 1)
  plots = [
      line_plot(os.path.join(output, "compare_bpd.png"), "held-out (solid) and train-split "
                "(dashed) negative ELBO", "bits per missing dim", [("bpd", pair("bpd"))]),
      line_plot(os.path.join(output, "compare_kl.png"), "held-out (solid) and train-split "
                "(dashed) KL", "nats / image",
                [(f"level {l}", pair("kl", level=l)) for l in levels]),
      line_plot(os.path.join(output, "compare_gap.png"), "held-out minus train-split KL",
                "nats / image",
                [(f"level {l}", [(r, metric("gap", "kl", level=l), r.name, colour[r.name])
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
  lines += [""] + markdown_table(header, rows) + [""]
  if levels:
    lines += ["Per level: held-out KL / gap (nats per image).", ""]
    lines += markdown_table(["level"] + [r.name for r in runs], [
        [str(l)] + [f"{_fmt(r, metric('eval', 'kl', level=l), 2)} / "
                    f"{_fmt(r, metric('gap', 'kl', level=l), 2)}"
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
    lines += markdown_table([f"{n} ({src})" for n, src, _ in grids],
                            [[f"![]({c})" for *_, c in grids]])
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
