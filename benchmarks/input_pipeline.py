"""Input-pipeline throughput: training images per second of every data source on this machine.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--seconds=5] [--batch_size=32]

Sources: embedded, synthetic, folder (on a generated tree of JPEGs of mixed sizes, prepared
first; its preparation time is reported too) and celeb_a (skipped, with the reason, when it is not
prepared and its manual files are absent). Prints a markdown table for BENCHMARKS.md.
"""

import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags, logging
from PIL import Image

from experiments import base
from hvae import data
from hvae.data import synthetic

_SECONDS = flags.DEFINE_float("seconds", 5.0, "timed seconds per source")
_BATCH = flags.DEFINE_integer("batch_size", 32, "global batch size")
_FILES = flags.DEFINE_integer("folder_files", 600, "images in the generated folder")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "config.data.num_workers")


def _make_tree(root: str, count: int) -> None:
  """JPEGs of several sizes (upscaled synthetic pictures), in a few sub-directories."""
  rng = np.random.default_rng(0)
  for i in range(count):
    side = int(rng.choice([96, 256, 512]))
    image = Image.fromarray(synthetic.render(0, i)).resize((side, side * 3 // 4))
    os.makedirs(f"{root}/d{i % 4}", exist_ok=True)
    image.save(f"{root}/d{i % 4}/{i}.jpg", quality=90)


def _throughput(config) -> float:
  iterator = data.create_train_iterator(config, process_index=0, process_count=1)
  for _ in range(3):  # warm-up: photo loading, thread start, first reads
    next(iterator)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    images += next(iterator)["image"].shape[0]
  rate = images / (time.perf_counter() - start)
  iterator.close()
  return rate


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "images")
    _make_tree(root, _FILES.value)
    for source in ("embedded", "synthetic", "folder", "celeb_a"):
      config = base.get_config()
      config.train.batch_size = _BATCH.value
      config.data.source = source
      config.data.path = root
      config.data.num_workers = _WORKERS.value
      config.data.train_mask = "freeform"
      note = "train mask freeform"
      if source == "folder":
        start = time.perf_counter()
        data.num_examples(config, "train")  # prepares the folder
        note += f"; {_FILES.value} JPEGs prepared in {time.perf_counter() - start:.1f} s"
      try:
        rate = f"{_throughput(config):,.0f}"
      except data.DataUnavailableError as e:
        rate, note = "skipped", str(e).splitlines()[0]
      rows.append((source, rate, note))
  print(
    f"\nInput pipeline, global batch {_BATCH.value}, num_workers={_WORKERS.value}, "
    f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
    f"{time.strftime('%Y-%m-%d')}\n"
  )
  print("| source | images/s | notes |\n|---|---:|---|")
  for source, rate, note in rows:
    print(f"| {source} | {rate} | {note} |")


if __name__ == "__main__":
  app.run(main)
