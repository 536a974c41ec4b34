"""Tests of hvae/console.py: known library chatter is dropped, everything else still shows."""

import logging

from absl import logging as absl_logging

from hvae import console


def test_known_library_noise_is_dropped_and_other_warnings_kept(caplog):
  console.quiet_libraries()
  console.quiet_libraries()  # idempotent: one filter
  assert logging.getLogger("absl").filters.count(console._FILTER) == 1  # pylint: disable=protected-access
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level
  for message in (
      "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
      "Given directory is read only=/runs/x/checkpoints",
      "Variant folder /c/hvae_image_folder/abc/1.0.0 has no dataset_info.json",
      "Using custom data configuration: BuilderConfig(name='abc')",
      "OpenCV is not installed. We recommend using OpenCV because it is faster",
  ):
    absl_logging.warning(message)
  assert caplog.text == ""
  absl_logging.warning("folder source: skipping bad.jpg: cannot decode")
  absl_logging.warning("Given up: the directory %s is read only", "/x")  # not the orbax line
  assert "skipping bad.jpg" in caplog.text and "Given up" in caplog.text


def test_tensorflow_import_banner_lines_are_recognised():
  noise = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796017827.865903    3503 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results\n",
    "I0000 00:00:1.0 7844 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n",
  ]
  kept = ["E0000 00:00:1.0 1 cuda_dnn.cc:8310] Unable to register cuDNN factory\n",
          "Traceback (most recent call last):\n"]
  assert all(any(p.search(line) for p in console.TF_IMPORT_NOISE) for line in noise)
  assert not any(p.search(line) for p in console.TF_IMPORT_NOISE for line in kept)
  console.import_tensorflow()  # whether or not it was imported before: no error
