"""A quiet, truthful console: hvae's own progress lines, not the libraries' chatter.

`eval_summary` is the training loop's one line per evaluation (every metric goes to the files).

`quiet_libraries()` (idempotent; `hvae.data` calls it on import, so every mode gets it) drops a
short list of known library messages that mislead or repeat on every run:

* TFDS, when hvae prepares a local image folder: "Variant folder ... has no dataset_info.json",
  "Using custom data configuration ...", and at read time "OpenCV is not installed ..." (Pillow
  decodes the 64x64 PNGs fine);
* orbax, on every read-only restore (`--mode=eval`, `--mode=inpaint`, `hvae.load`):
  "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0." and "Given
  directory is read only=...";
* TensorFlow's C++ lines at import ("oneDNN custom operations are on ...", "This TensorFlow
  binary is optimized ..."): TF 2.21 writes them before its logging is set up, ignoring
  `TF_CPP_MIN_LOG_LEVEL`, so `import_tensorflow()` imports it with file descriptor 2 sent to a
  temporary file and then writes back every line that is not one of `TF_IMPORT_NOISE`.

Only these exact messages are dropped (`NOISE`); every other warning still shows. TFDS's printed
"Downloading and preparing dataset ..." banner and its progress bars are silenced where hvae
prepares a folder (`hvae.data.folder.prepare`), which prints its own one-line progress instead.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hvae import metric_names

NOISE = tuple(re.compile(p) for p in (
  r"^Variant folder .* has no dataset_info\.json",
  r"^Using custom data configuration",
  r"^OpenCV is not installed",
  r"^CheckpointManagerOptions\.read_only=True",
  r"^Given directory is read only",
))


TF_IMPORT_NOISE = tuple(re.compile(p) for p in (
  r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
  r"oneDNN custom operations are on",
  r"cpu_feature_guard\.cc",
  r"^To enable the following instructions: .* rebuild TensorFlow",
))


class NoiseFilter(logging.Filter):
  """Drops the log records whose message matches one of `NOISE`."""

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except  (a malformed record is not ours to judge)
      return True
    return not any(p.search(message) for p in NOISE)


_FILTER = NoiseFilter()


def quiet_libraries() -> None:
  """Installs the noise filter on the absl logger (TFDS and orbax log through absl); idempotent."""
  for name in ("absl", ""):  # absl.logging's logger, and the root for plain `logging` users
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


def import_tensorflow() -> None:
  """Imports TensorFlow (once) without its C++ start-up banner; other stderr output is kept.

  Call it before a library that imports TensorFlow (clu's summary writer, TFDS's builders). The
  banner is written to file descriptor 2 by C++, out of reach of Python's logging, so the import
  runs with descriptor 2 redirected to a temporary file, which is then copied back to stderr
  without the lines of `TF_IMPORT_NOISE`. Nothing is lost: an import error is still raised, and
  any other line (from TensorFlow or another thread) is written back, only later.
  """
  if "tensorflow" in sys.modules:
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real stderr (some notebooks): import as usual
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    return
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [line for line in capture.read().decode(errors="replace").splitlines(True)
              if not any(p.search(line) for p in TF_IMPORT_NOISE)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def eval_summary(step: int, metrics: Mapping[str, Any], overfitting: Sequence[int] = (),
                 seconds: float | None = None) -> str:
  """The console line of one evaluation; the full set of metrics goes to the files.

  Args:
    step: the training step.
    metrics: the evaluation's metrics (docs/design.md §7 names: `eval/bpd`, `eval_train/bpd`,
      `gap/bpd`, `eval/kl/level_l`); missing ones are left out of the line.
    overfitting: the levels the verdict flags (hvae/verdict.py); None-like when it did not run.
    seconds: how long the evaluation took.

  Returns:
    e.g. "eval step 500: bpd 6.139 (train-split 5.301, gap 0.838)  held-out KL L1 12.3
    L2 4.56 L3 0.78  verdict: level 3 overfits  (5.2 s)".
  """
  def num(name: str, digits: int = 3) -> str:
    value = to_float(metrics[name])
    return f"{value:.{digits}f}" if math.isfinite(value) else "nan"

  parts = [f"eval step {int(step)}:"]
  if "eval/bpd" in metrics:
    extra = [f"{label} {num(name)}" for label, name in
             (("train-split", "eval_train/bpd"), ("gap", "gap/bpd")) if name in metrics]
    parts.append(f"bpd {num('eval/bpd')}" + (f" ({', '.join(extra)})" if extra else ""))
  levels = metric_names.levels(metrics, metric_names.EVAL, "kl")
  if levels:
    parts.append(" held-out KL " + " ".join(
        f"L{l} {_short(to_float(metrics[metric_names.name('eval', 'kl', level=l)]))}"
        for l in levels))
    flagged = sorted(overfitting)
    verdict = ("no level overfits" if not flagged else
               f"level{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))} "
               f"overfit{'' if len(flagged) > 1 else 's'}")
    parts.append(f" verdict: {verdict}")
  if seconds is not None:
    parts.append(f" ({seconds:.1f} s)")
  return " ".join(parts)


def _short(value: float) -> str:
  """3 significant digits, no exponent for everyday KL values (nats per image)."""
  if not math.isfinite(value):
    return "nan"
  return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def to_float(value: Any) -> float:
  """A Python float from a Python/numpy/jax scalar or size-1 array."""
  return float(np.asarray(value).reshape(()))
