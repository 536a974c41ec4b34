"""WORKDIR/run_info.json: what produced a run, written by `train` at every start (hvae/loop.py).

`command` (sys.argv), `git_commit` and `git_dirty` (whether tracked files differed from that
commit), `python`, the versions of the packages that decide the numbers, the `devices`, the
`process_count` and the `start_time`. `--mode=report` reads `command` for a run's title.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

import jax

from hvae import atomic
from hvae.writers import writing

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain",
             "ml-collections", "clu", "numpy")


def _git(*args: str) -> str | None:
  try:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                          cwd=os.path.dirname(__file__))
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit() -> tuple[str | None, bool | None]:
  """(HEAD, whether tracked files differ from it): a run from an uncommitted tree says so."""
  commit = _git("rev-parse", "HEAD") or None
  status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
  return commit, (bool(status) if status is not None else None)


def write(workdir: str) -> None:
  """WORKDIR/run_info.json (process 0 calls it; a failed write is `FileWriteError`)."""
  versions = {}
  for p in _PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  commit, dirty = _git_commit()
  info = {"command": sys.argv, "git_commit": commit, "git_dirty": dirty,
          "python": platform.python_version(),
          "packages": versions, "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count(),
          "start_time": datetime.datetime.now(datetime.UTC).isoformat()}
  path = os.path.join(workdir, "run_info.json")
  with writing(path):
    atomic.write_json(path, info, indent=2)
