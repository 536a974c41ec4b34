"""`hvae.load`, `--mode=eval` and `--mode=inpaint` end to end on a workdir of experiments/tiny.py.

The workdir is trained once per module through launch.py (as tests/test_launch.py does); the
modes run through launch.py in subprocesses, `hvae.load` in-process.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import centre_mask
from PIL import Image

import hvae
from hvae.data import images as image_io
from hvae.data import masks as masks_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "launch.py", *args, "--jax_cache="], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("tiny_api")
  _launch("--config=experiments/tiny.py", f"--workdir={w}")
  return w


def _read(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def test_eval_mode_writes_results_grid_and_tensorboard(workdir):
  _launch("--mode=eval", f"--workdir={workdir}", "--mask=boxes", "--num_samples=3",
          "--temperature=0.9")
  out = workdir / "eval"
  results = json.loads((out / "results.json").read_text())
  assert results["split"] == "validation" and results["mask"] == "boxes"
  assert results["iw_samples"] == 4 and results["num_samples"] == 3  # tiny: eval.iw_samples=4
  assert results["checkpoint_step"] in (3, 6) and results["num_examples"] == 8
  m = results["metrics"]
  for name in ("iw_bpd", "iw_ess", "bpd", "recon_bpd", "psnr_best", "psnr_mean", "psnr_rank",
               "psnr_of_mean", "ssim", "l1", "diversity", "seam", "kl/level_1", "kl/level_2"):
    assert np.isfinite(m[f"eval/{name}"]), name
  assert 1.0 <= m["eval/iw_ess"] <= 4.0
  assert m["eval/psnr_mean"] <= m["eval/psnr_best"] <= 100.0
  assert m["eval/psnr_rank"] <= m["eval/psnr_best"]
  assert len(results["per_example"]["iw_bpd"]) == 8
  assert _read(out / "grid.png").shape[1] > 64 * 6  # context, truth, 3 fill-ins, mean
  assert list(out.glob("events.out.tfevents*"))


def test_inpaint_mode_keeps_the_given_pixels_exactly(workdir, tmp_path):
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  rs = np.random.RandomState(0)
  Image.fromarray(rs.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "a.png")
  Image.fromarray(rs.randint(0, 256, (90, 150, 4), dtype=np.uint8), "RGBA").save(src / "b.png")
  Image.fromarray(rs.randint(0, 256, (80, 70), dtype=np.uint8), "L").save(src / "sub" / "c.jpg")
  (src / "broken.jpg").write_bytes(b"not an image")
  out = tmp_path / "out"
  proc = _launch("--mode=inpaint", f"--workdir={workdir}", f"--input={src}", f"--output={out}",
                 "--mask=box:8,16,20,12", "--num_samples=2", "--rank")
  assert "broken.jpg" in proc.stderr  # named, skipped, and the run goes on
  mask = np.ones((64, 64, 1), bool)
  mask[16:28, 8:28] = False  # box:X=8,Y=16,W=20,H=12
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results["images"]] == ["a", "b", "sub__c"]
  for r in results["images"]:
    expected = image_io.centre_crop_resize(image_io.decode_file(r["source"]), 64)
    given = np.broadcast_to(mask, expected.shape)
    np.testing.assert_array_equal(_read(out / r["files"]["input"]), expected)
    context = _read(out / r["files"]["context"])
    np.testing.assert_array_equal(context[given], expected[given])
    assert np.all(context[~given] == 128)
    for name in r["files"]["fills"]:
      np.testing.assert_array_equal(_read(out / name)[given], expected[given])
    assert len(r["bpd"]) == 2 and r["bpd"][0] <= r["bpd"][1]  # ranked, most likely first
  assert not list(out.glob("broken*"))
  assert _read(out / "grid.png").shape[0] > 3 * 64


def test_mask_images_are_black_for_missing(tmp_path):
  from hvae.modes import inpaint

  mask = np.full((128, 256), 255, np.uint8)  # cropped to the centre 128x128, then halved
  mask[0:20, 64:128] = 0
  Image.fromarray(mask).save(tmp_path / "m.png")
  m = inpaint.make_masks(str(tmp_path / "m.png"), 2, seed=0)
  assert m.shape == (2, 64, 64, 1)
  assert m[0, :10, :32].max() == 0.0 and m[0, 12:, :].min() == 1.0 and m[0, :, 33:].min() == 1.0
  np.testing.assert_array_equal(inpaint.make_masks("centre", 1, 0)[0], masks_lib.centre(None))
  with pytest.raises(ValueError, match="box:"):
    inpaint.make_masks("box:60,60,10,10", 1, 0)


def test_load_gives_fill_ins_and_figures(workdir):
  in_flight = workdir / "checkpoints" / "9.orbax-checkpoint-tmp"  # a training run's save
  in_flight.mkdir()
  model = hvae.load(str(workdir), checkpoint=3)
  assert in_flight.is_dir()  # opened read-only: nothing of the run is touched
  in_flight.rmdir()
  assert model.step == 3 and model.ema
  assert "level_1" in model.params and "level_2" in model.params
  images = np.stack([np.full((64, 64, 3), 60, np.uint8), np.full((64, 64, 3), 200, np.uint8)])
  mask = centre_mask(1)[0]  # one mask for the batch
  fills = model.fill_in(images, mask, n=3, temperature=(0.5, 1.0), seed=1)
  assert fills.shape == (3, 2, 64, 64, 3) and fills.dtype == np.uint8
  given = np.broadcast_to(mask > 0.5, images.shape)
  for f in fills:
    np.testing.assert_array_equal(f[given], images[given])
  figures = model.evaluate(images, mask, k=4)
  assert figures["iw_bpd"].shape == (2,) and np.all(np.isfinite(figures["iw_bpd"]))
  assert np.all((figures["iw_ess"] >= 1.0) & (figures["iw_ess"] <= 4.0))
  assert np.all(figures["num_dims"] == 3 * 32 * 32)
  with pytest.raises(ValueError, match="temperature"):
    model.fill_in(images, mask, n=1, temperature=(1.0, 1.0, 1.0))
