"""A run's held-out photos as a folder: the `--input` of `--mode=eval` and of
benchmarks/temperature_sweep.py, as docs/results.md uses them.

  python -m benchmarks.held_out_photos --workdir=runs/faces_s0 --output=held_out/ \
      [--count=300] [--per_group=3] [--copy] [--data_path=/photos/where/they/are/now]

The photos are those of `data.path` on the validation side of the run's split (its
`config.json`: `data.validation_fraction`, `data.split_by`; the folder is prepared as the run
prepared it, or its build reused, so undecodable files are left out as the run left them out),
so with LFW names no person among them has a training photo. They are taken in name order,
at most --per_group of each group (a person, for `data.split_by='(.+)_\\d+$'`) and at most
--count in all: a fixed set, the same on every machine, that spreads over many persons instead
of the first few. The folder gets symbolic links to them (--copy: copies) and `.held_out.txt`,
the list (hidden: the folder source skips it).
"""

from __future__ import annotations

import collections
import os
import shutil
import sys

from absl import app, flags


def _define_flags() -> dict:
  """The command line (defined when run as a script only: the tests import this module in a
  process that has launch.py's flags)."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "A run of the folder source.",
                                     required=True),
      "output": flags.DEFINE_string("output", None, "The folder to fill (new or empty).",
                                    required=True),
      "count": flags.DEFINE_integer("count", 300, "At most this many photos.", lower_bound=1),
      "per_group": flags.DEFINE_integer("per_group", 3, "At most this many of each group.",
                                        lower_bound=1),
      "copy": flags.DEFINE_bool("copy", False, "Copy the files instead of linking them."),
      "data_path": flags.DEFINE_string("data_path", None, "The run's data.path where it lies "
                                       "on this machine (default: the one in config.json)."),
  }


def select(files: list[str], config, count: int, per_group: int) -> list[str]:
  """The first `count` of `files` (name order) with at most `per_group` of each group."""
  from hvae.data import folder  # pylint: disable=g-import-not-at-top

  pattern = folder.split_pattern(config.data.get("split_by", ""))
  taken, chosen = collections.Counter(), []
  for rel in sorted(files):
    group = folder.group_of(rel, pattern)
    if taken[group] < per_group:
      taken[group] += 1
      chosen.append(rel)
      if len(chosen) == count:
        break
  return chosen


def write(workdir: str, output: str, *, count: int = 300, per_group: int = 3,
          copy: bool = False, data_path: str | None = None) -> list[str]:
  """Fills `output` with the run's held-out photos (see the module docstring).

  Returns:
    The chosen files, relative to `data.path`.

  Raises:
    ConfigError: the run has no config.json, is not of the folder source, `output` is not an
      empty folder, or the split has no held-out photo.
    DataUnavailableError: the photos' folder is missing (give `data_path`).
  """
  from hvae import config_file  # pylint: disable=g-import-not-at-top
  from hvae.data import folder  # pylint: disable=g-import-not-at-top
  from hvae.errors import ConfigError  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"--workdir: {workdir} has no config.json (is it a training run?)")
  config = config_file.load_config(path)
  if data_path:
    config.data.path = data_path
  if config.data.source != "folder":
    raise ConfigError(f"data.source: {config.data.source!r}; only a run of the folder source "
                      "has photos to link (others evaluate on their validation split as is)")
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ConfigError(f"--output: {output} exists and is not an empty folder")
  root, files = folder.held_out_files(config)
  chosen = select(files, config, count, per_group)
  if not chosen:
    raise ConfigError(f"data.path: {root} has no photo on the validation side of the split")
  names = [rel.replace("/", "__") for rel in chosen]
  if len(set(names)) < len(names):
    raise ConfigError("--output: two chosen photos would get the same name (a/b.png and "
                      "a__b.png); rename one")
  os.makedirs(output, exist_ok=True)
  for rel, name in zip(chosen, names):
    source, target = os.path.join(root, rel), os.path.join(output, name)
    if copy:
      shutil.copy2(source, target)
    else:
      os.symlink(os.path.abspath(source), target)
  with open(os.path.join(output, ".held_out.txt"), "w") as f:
    f.write("".join(rel + "\n" for rel in chosen))
  return chosen


def main(argv, flag_values: dict):
  del argv
  from hvae.errors import ConfigError, DataUnavailableError  # pylint: disable=g-import-not-at-top

  f = {name: flag.value for name, flag in flag_values.items()}
  try:
    chosen = write(f["workdir"], f["output"], count=f["count"], per_group=f["per_group"],
                   copy=f["copy"], data_path=f["data_path"])
  except (ConfigError, DataUnavailableError, OSError) as e:
    print(f"held_out_photos: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{len(chosen)} held-out photos in {f['output']} (list: .held_out.txt)")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
