"""What the reports draw: line plots of logged metrics over steps, and Markdown tables.

Shared by the run report (hvae/report.py) and the sweep report (hvae/sweep_report.py). Plots go
through `matplotlib.figure.Figure` (Agg, no pyplot), so no display and no global state is needed.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence

from matplotlib.figure import Figure

REPORT_DIR = "report"  # WORKDIR/report/: where --mode=report writes (docs/design.md §7)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """A Markdown table as lines: the header, the separator, one line per row of cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def line_plot(path: str, title: str, ylabel: str, panels: Sequence[tuple[str, list]],
              zero_line: bool = False) -> str | None:
  """Saves one figure of panels of metric curves over training steps.

  Args:
    path: the PNG to write.
    title: the figure's title (wrapped to its width).
    ylabel: every panel's y-axis label.
    panels: (panel title, curves); a curve is (run, metric name, legend label or None,
      matplotlib style dict), `run` anything with `series(name) -> (steps, values)`
      (`hvae.metrics_file.Run`).
    zero_line: draw y = 0 in every panel.

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
