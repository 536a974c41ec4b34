"""`hvae.load`, `--mode=eval` and `--mode=inpaint` end to end on a workdir of experiments/tiny.py.

The workdir is a copy of the suite's tiny run (conftest's `tiny_straight`, trained in-process once
per test process; tests/test_launch.py trains through launch.py itself); the modes run through
launch.py's main and `hvae.load`, all in this process: no interpreter start-up or imports per
mode, and what one compiles the next finds (launch.py in a process of its own:
tests/test_launch.py, and `--mode=eval` in tests/test_multihost.py).
"""

import json
import shutil

import numpy as np
import pytest
from helpers import centre_mask, launch_in_process, load_experiment, random_images
from PIL import Image

import hvae
from hvae import baselines, errors, quality, sampling
from hvae.data import image_files
from hvae.data import masks as masks_lib


def _launch(capsys, monkeypatch, *args) -> str:
  """launch.py ARGS in this process; its stdout. Exit status 0, or the test fails."""
  code, stderr, stdout = launch_in_process(capsys, monkeypatch, *args, stdout=True)
  assert code == 0, stderr[-3000:]
  return stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_straight):
  """A copy of the suite's tiny run (conftest's `tiny_straight`: checkpoints 3 and 6, step 6
  evaluated, so also the best): the modes write into it."""
  w = tmp_path_factory.mktemp("tiny_api") / "run"
  shutil.copytree(tiny_straight[2], w)
  return w


def _read(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


METHODS = ("mode", "mean", "sample", "best_of_N", "ranked", "mean_of_samples", "biharmonic",
           "ring_mean")


def test_eval_mode_writes_results_table_grid_and_tensorboard(workdir, capsys, monkeypatch):
  stdout = _launch(capsys, monkeypatch, "--mode=eval", f"--workdir={workdir}", "--mask=boxes",
                   "--num_samples=3", "--temperature=0.9")
  out = workdir / "eval"
  results = json.loads((out / "results.json").read_text())
  assert results["split"] == "validation" and results["mask"] == "boxes"
  assert results["iw_samples"] == 4 and results["num_samples"] == 3  # tiny: eval.iw_samples=4
  assert results["checkpoint_step"] in (3, 6) and results["num_examples"] == 8
  assert results["temperature"] == 0.9 and results["reference"] == "biharmonic"
  m = results["metrics"]
  for name in ("iw_bpd", "iw_ess", "bpd", "recon_bpd", "psnr_best", "psnr_mean", "psnr_rank",
               "psnr_of_mean", "ssim", "l1", "diversity", "seam", "kl/level_1", "kl/level_2"):
    assert np.isfinite(m[f"eval/{name}"]), name
  assert 1.0 <= m["eval/iw_ess"] <= 4.0
  assert m["eval/psnr_mean"] <= m["eval/psnr_best"] <= 100.0
  assert m["eval/psnr_rank"] <= m["eval/psnr_best"]
  assert list(results["methods"]) == list(METHODS)
  for method in METHODS:
    for fig in ("psnr", "ssim", "l1", "hf_ratio", "seam"):
      assert np.isfinite(m[f"eval/{method}/{fig}"]), (method, fig)
      assert results["methods"][method][fig] == m[f"eval/{method}/{fig}"]
    assert len(results["per_example"][f"{method}/psnr"]) == 8
    if method != "biharmonic":
      for name in ("psnr_vs_biharmonic", "ssim_vs_biharmonic"):
        assert np.isfinite(m[f"eval/{method}/{name}"]) and m[f"eval/{method}/{name}_stderr"] >= 0
        assert 0 <= m[f"eval/{method}/{name}_wins"] <= 8
  assert "eval/biharmonic/psnr_vs_biharmonic" not in m
  # The old names are the sample methods' figures.
  assert m["eval/psnr_best"] == m["eval/best_of_N/psnr"]
  assert m["eval/psnr_rank"] == m["eval/ranked/psnr"]
  assert m["eval/psnr_mean"] == pytest.approx(m["eval/sample/psnr"])
  assert len(results["per_example"]["iw_bpd"]) == 8
  # How the 3 samples lie around the truth (hvae.quality.coverage), with the sample figures.
  assert m["eval/sample/spread_ratio"] >= 0 and 0 <= m["eval/sample/truth_rank"] <= 1
  assert m["eval/sample/truth_outside"] in np.arange(9) / 8  # a fraction of the 8 examples
  assert len(results["per_example"]["sample/truth_outside"]) == 8
  table = (out / "table.md").read_text()
  assert "| mode |" in table and "ΔPSNR vs biharmonic" in table and table in stdout
  assert "Coverage of the truth by the samples: spread ratio " in table
  # context, truth, biharmonic, mode, mean, 3 samples
  assert _read(out / "grid.png").shape[1] > 2 * 64 * 8
  assert list(out.glob("events.out.tfevents*"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Three complete images (one in a subfolder) of a user's folder."""
  src = tmp_path_factory.mktemp("photos") / "holiday"
  (src / "sub").mkdir(parents=True)
  for i, (name, image) in enumerate(zip(("a.png", "b.png", "sub/c.png"), random_images(3, 5))):
    Image.fromarray(np.roll(image, 3 * i, axis=1)).save(src / name)
  return src


@pytest.fixture(scope="module")
def model(workdir):
  return hvae.load(str(workdir))


def test_eval_scores_exactly_the_input_images(workdir, photos, model):
  from hvae.modes import evaluate

  r = evaluate.run(str(workdir), input_path=str(photos), baseline_names="ring_mean",
                   model=model)
  out = workdir / "eval" / "holiday"  # next to, not over, the split's results
  assert json.loads((out / "results.json").read_text())["input"] == str(photos)
  assert (out / "table.md").is_file() and (out / "grid.png").is_file()
  assert r["num_examples"] == 3 and r["split"] is None and r["mask"] == "centre"
  assert r["per_example"]["name"] == ["a.png", "b.png", "sub__c.png"]
  assert r["temperature"] == sampling.DEFAULT_TEMPERATURE  # eval.temperature is ''
  assert r["reference"] == "ring_mean" and "biharmonic" not in r["methods"]
  assert "psnr_vs_ring_mean_wins" in r["methods"]["mode"]
  assert np.isfinite(r["metrics"]["eval/iw_bpd"])
  # The same figures as scoring those 64x64 images by hand.
  truth = np.stack([image_files.centre_crop_resize(image_files.decode_file(photos / f), 64)
                    for f in ("a.png", "b.png", "sub/c.png")])
  mask = centre_mask(3)
  mode = model.mode(truth, mask)
  expected = [quality.psnr(mode[b], truth[b], mask[b]) for b in range(3)]
  np.testing.assert_allclose(r["per_example"]["mode/psnr"], expected)
  ring = [quality.ssim(baselines.ring_mean(truth[b], mask[b]), truth[b], mask[b])
          for b in range(3)]
  np.testing.assert_allclose(r["per_example"]["ring_mean/ssim"], ring)


def test_inpaint_writes_mode_and_mean_equal_to_the_api_and_scores_complete_images(
    workdir, photos, model, tmp_path, capsys):
  from hvae.modes import inpaint

  out = tmp_path / "out"
  r = inpaint.run(str(workdir), str(photos), str(out), num_samples=2, fill="all")
  names = [rec["name"] for rec in r["images"]]
  assert names == ["a.png", "b.png", "sub__c.png"] and r["scored"]
  truth = np.stack([_read(out / f"{name}_input.png") for name in names])
  mask = centre_mask(3)
  np.testing.assert_array_equal(np.stack([_read(out / f"{n}_mode.png") for n in names]),
                                model.mode(truth, mask))
  given = np.broadcast_to(mask > 0.5, truth.shape)
  for file in ("mean", "biharmonic", "ring_mean", "fill_2"):
    pixels = np.stack([_read(out / f"{n}_{file}.png") for n in names])
    np.testing.assert_array_equal(pixels[given], truth[given])
  rec = r["images"][0]
  assert set(rec["figures"]) == set(METHODS) - {"ranked"}  # not ranked: no ranked method
  assert rec["figures"]["biharmonic"]["psnr"] == pytest.approx(quality.psnr(
      baselines.biharmonic(truth[0], mask[0]), truth[0], mask[0]))
  printed = capsys.readouterr().out
  assert "| biharmonic |" in printed and "| sub__c.png |" in printed
  # The pixels and the temperature of the samples are recorded, as eval records them.
  pixels_used = sampling.default_pixels(model.config)
  assert r["pixels"] == pixels_used and r["temperature"] == sampling.default_temperature(
      model.config)
  assert f"pixels {pixels_used}" in (out / "table.md").read_text().splitlines()[0]
  assert json.loads((out / "results.json").read_text())["pixels"] == pixels_used
  assert "per image" in (out / "table.md").read_text()
  # A mask image marks what to remove: the pixels under it are not a truth, nothing is scored.
  Image.fromarray(np.where(mask[0, ..., 0] > 0.5, 255, 0).astype(np.uint8)).save(
      tmp_path / "m.png")
  r = inpaint.run(str(workdir), str(photos / "a.png"), str(tmp_path / "o2"), num_samples=2,
                  mask=str(tmp_path / "m.png"), fill="mode", baseline_names="none")
  assert not r["scored"] and "figures" not in r["images"][0] and "methods" not in r
  assert sorted(p.name for p in (tmp_path / "o2").glob("a.png_*")) == [
      "a.png_context.png", "a.png_input.png", "a.png_mode.png"]


def test_api_mode_and_mean(model):
  images, mask = random_images(3, seed=7), centre_mask(1)[0]
  mode = model.mode(images, mask)
  assert mode.shape == (3, 64, 64, 3) and mode.dtype == np.uint8
  np.testing.assert_array_equal(model.mode(images, mask), mode)  # deterministic
  mean = model.mean(images, mask, n=2, seed=0)
  assert mean.shape == (3, 64, 64, 3) and mean.dtype == np.uint8
  given = np.broadcast_to(mask > 0.5, images.shape)
  np.testing.assert_array_equal(mean[given], images[given])
  # At tau = 0 every latent draw is the prior mean: the mean no longer depends on the seed.
  np.testing.assert_array_equal(model.mean(images, mask, n=2, temperature=0.0, seed=0),
                                model.mean(images, mask, n=2, temperature=0.0, seed=1))
  assert model.temperatures(None) == (sampling.DEFAULT_TEMPERATURE,) * 2


def test_pixel_temperature_goes_from_the_likelihood_s_mode_to_a_sample(model):
  """pixels="sample:T": T = 1 is "sample" exactly; T = 0 keeps the drawn latents and takes the
  likelihood's mode given them (the likeliest component, no per-pixel noise), so its fill-ins
  are smoother (smaller Laplacian)."""
  assert sampling.parse_pixels("sample:0.3") == ("sample", 0.3)
  assert sampling.parse_pixels("sample") == ("sample", 1.0)
  assert sampling.parse_pixels("mean") == ("mean", 1.0)
  for bad in ("mean:0.5", "sample:hot", "sample:-1", "sample:3", "median"):
    with pytest.raises(errors.ConfigError, match="pixels: .* is not one of sample, mean"):
      sampling.parse_pixels(bad)
  images, mask = random_images(2, seed=3), centre_mask(1)[0]
  draws = {p: model.fill_in(images, mask, n=2, seed=4, pixels=p)
           for p in ("sample", "sample:1", "sample:0")}
  np.testing.assert_array_equal(draws["sample"], draws["sample:1"])
  hole = (slice(None), slice(None), slice(16, 48), slice(16, 48))
  roughness = {p: np.abs(np.diff(d[hole].astype(np.float32), axis=2)).mean()
               for p, d in draws.items()}
  assert roughness["sample:0"] < roughness["sample"], roughness


def test_temperature_sweep_tabulates_every_method_and_tau(workdir, photos, model, monkeypatch):
  from hvae.modes import evaluate

  monkeypatch.setattr(hvae.api, "load", lambda *a, **k: model)  # loaded once already
  text_tau = "1" + "/0" * (model.model.config.num_levels - 1)  # only level 1 sampled
  per_level = evaluate.parse_tau(text_tau)
  tables, text = evaluate.temperature_sweep(str(workdir), (0.0, 1.0, per_level),
                                            input_path=str(photos), baseline_names="biharmonic")
  assert list(tables) == [0.0, 1.0, per_level] and "mode" in tables[0.0]
  assert "biharmonic" in tables[1.0]
  assert tables[0.0]["mode"] == tables[1.0]["mode"]  # tau does not touch the mode fill-in
  assert "| mean | 0 |" in text and "| mean | 1 |" in text
  label = evaluate.tau_label(per_level)
  assert label == text_tau and per_level == (1.0,) + (0.0,) * (len(per_level) - 1)
  assert f"| sample | {label} |" in text
  assert "| tau | spread ratio | truth's rank | truth farthest out |" in text
  assert f"| {label} | " in text  # the coverage of the samples at every tau
  assert not any("*" in line for line in text.splitlines() if line.startswith("| mode |"))
  out = workdir / "eval" / "temperature_sweep" / "holiday"
  assert (out / "table.md").read_text() == text
  assert (out / "tau_0" / "results.json").is_file()
  assert (out / ("tau_" + label.replace("/", "-")) / "results.json").is_file()


def test_default_temperature_comes_from_eval_temperature():
  from hvae.modes import evaluate

  config = load_experiment("tiny")
  assert sampling.default_temperature(config) == sampling.DEFAULT_TEMPERATURE
  assert evaluate.resolve_temperature(None, config) == sampling.DEFAULT_TEMPERATURE
  config.eval.temperature = "0.5,0.8"
  assert sampling.default_temperature(config) == (0.5, 0.8)
  assert evaluate.resolve_temperature("0.7", config) == 0.7
  assert sampling.default_temperature(None) == sampling.DEFAULT_TEMPERATURE


def test_inpaint_mode_keeps_the_given_pixels_exactly(workdir, tmp_path, capsys, monkeypatch,
                                                     caplog):
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  rs = np.random.RandomState(0)
  Image.fromarray(rs.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "a.png")
  Image.fromarray(rs.randint(0, 256, (90, 150, 4), dtype=np.uint8), "RGBA").save(src / "b.png")
  Image.fromarray(rs.randint(0, 256, (80, 70), dtype=np.uint8), "L").save(src / "sub" / "c.jpg")
  (src / "broken.jpg").write_bytes(b"not an image")
  out = tmp_path / "out"
  _launch(capsys, monkeypatch, "--mode=inpaint", f"--workdir={workdir}", f"--input={src}",
          f"--output={out}", "--mask=box:8,16,20,12", "--num_samples=2", "--rank")
  assert "broken.jpg" in caplog.text  # named, skipped, and the run goes on
  mask = np.ones((64, 64, 1), bool)
  mask[16:28, 8:28] = False  # box:X=8,Y=16,W=20,H=12
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results["images"]] == ["a.png", "b.png", "sub__c.jpg"]
  for r in results["images"]:
    expected = image_files.centre_crop_resize(image_files.decode_file(r["source"]), 64)
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
