"""A quiet, truthful console: hvae's own progress lines, not the libraries' chatter.

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
import os
import re
import sys
import tempfile

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
