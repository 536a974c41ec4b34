"""Atomic writes of the small text and JSON files of a run (config.json, run_info.json,
results.json, sweep.json, flops.json, a rewritten metrics.jsonl).

The content goes to a temporary file in the target's directory (so the rename stays on one
filesystem), is flushed to disk, and replaces the target with `os.replace`: a reader, or a
process killed mid-write, never sees half a file. The temporary name is unique to the process
and the call, so concurrent writers (array tasks writing the same manifest) do not collide.
Imports nothing heavy: `--mode=report` and sweep expansion stay free of JAX.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def json_safe(value: Any) -> Any:
  """NaN and infinities -> None, recursively through dicts, lists and tuples (strict JSON)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, value: Any, *, indent: int = 1, strict: bool = False,
               **dump_kwargs) -> None:
  """Writes `value` as JSON to `path` atomically.

  Args:
    path: the file.
    value: what `json.dumps` can encode.
    indent: as for `json.dumps`.
    strict: write NaN and infinities as null (strict JSON) instead of NaN / Infinity.
    **dump_kwargs: further `json.dumps` arguments (sort_keys, default, ...).
  """
  write_text(path, json.dumps(json_safe(value) if strict else value, indent=indent,
                              **dump_kwargs))
