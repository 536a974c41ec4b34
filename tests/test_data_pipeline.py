"""Tests of hvae/data/pipeline.py: batch format, determinism, resume, sharding, evaluation."""

import itertools
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from experiments import base
from hvae import data
from hvae.data import masks, pipeline, synthetic


def _config(batch_size=8, **data_fields):
  config = base.get_config()
  config.train.batch_size = batch_size
  for key, value in data_fields.items():
    setattr(config.data, key, value)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batch(batch, b):
  assert set(batch) >= {"image", "mask"}
  assert batch["image"].shape == (b, 64, 64, 3) and batch["image"].dtype == np.uint8
  assert batch["mask"].shape == (b, 64, 64, 1) and batch["mask"].dtype == np.float32
  assert set(np.unique(batch["mask"])) <= {0.0, 1.0}


def _equal(a, b):
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(autouse=True, scope="module")
def _cache_in_tmp(tmp_path_factory):
  """Prepared folders go to a temporary cache, never the real ~/.cache/hvae/datasets."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    yield


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree")
  rng = np.random.default_rng(0)
  for i in range(24):
    pixels = rng.integers(0, 256, (64 + i, 64, 3), np.uint8)
    os.makedirs(root / f"d{i % 3}", exist_ok=True)
    Image.fromarray(pixels).save(root / f"d{i % 3}" / f"{i}.png")
  return str(root)


@pytest.mark.parametrize("source", ["embedded", "synthetic", "folder"])
@pytest.mark.parametrize("mask", sorted(masks.MASKS))
def test_train_batches(source, mask, image_tree):
  config = _config(source=source, path=image_tree, train_mask=mask)
  batches = _take(data.create_train_iterator(config, process_index=0, process_count=1), 3)
  for batch in batches:
    _assert_batch(batch, 8)
    assert set(batch) == {"image", "mask"}
  assert len({b["image"].tobytes() for b in batches}) == 3
  if mask == "centre":
    assert (batches[0]["mask"][:, 16:48, 16:48] == 0).all()


def test_train_order_is_a_function_of_seed_and_step():
  config = _config(source="synthetic", train_mask="freeform")
  a = _take(data.create_train_iterator(config, process_index=0, process_count=1), 4)
  b = _take(data.create_train_iterator(config, process_index=0, process_count=1), 4)
  _equal(a, b)
  config.seed = 1
  c = next(data.create_train_iterator(config, process_index=0, process_count=1))
  assert not np.array_equal(a[0]["image"], c["image"])
  assert not np.array_equal(a[0]["mask"], c["mask"])


@pytest.mark.parametrize("source", ["embedded", "synthetic"])
def test_restoring_the_state_reproduces_the_next_batches(source):
  config = _config(source=source, train_mask="boxes")
  iterator = data.create_train_iterator(config, process_index=0, process_count=1)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint would store
  expected = _take(iterator, 3)
  resumed = data.create_train_iterator(config, process_index=0, process_count=1)
  resumed.set_state(state)
  _equal(_take(resumed, 3), expected)


def _hashes(images):
  return [img.tobytes() for img in images]


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_two_processes_see_disjoint_shards_of_each_global_batch(source, image_tree):
  config = _config(batch_size=8, source=source, path=image_tree, flip=False)
  whole = data.create_train_iterator(config, process_index=0, process_count=1)
  shards = [data.create_train_iterator(config, process_index=p, process_count=2) for p in (0, 1)]
  steps = 3 if source == "folder" else 2048 // 8  # one full epoch of the synthetic train split
  seen = []
  for _ in range(steps):
    global_batch = next(whole)
    local = [next(s) for s in shards]
    for batch in local:
      _assert_batch(batch, 4)
    joined = np.concatenate([b["image"] for b in local])
    np.testing.assert_array_equal(joined, global_batch["image"])
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in local]), global_batch["mask"])
    assert not set(_hashes(local[0]["image"])) & set(_hashes(local[1]["image"]))
    seen += _hashes(joined)
  if source == "synthetic":  # together the two shards cover the whole epoch exactly once
    epoch = _hashes(synthetic.render(0, i) for i in range(synthetic.SIZES["train"]))
    assert sorted(seen) == sorted(epoch)


@pytest.mark.parametrize("source", ["embedded", "synthetic", "folder"])
def test_eval_batches_are_deterministic_and_padded(source, image_tree):
  config = _config(source=source, path=image_tree, eval_mask="freeform")
  a = data.eval_batches(config, "validation", 10, 4, process_index=0, process_count=1)
  b = data.eval_batches(config, "validation", 10, 4, process_index=0, process_count=1)
  _equal(a, b)
  total = min(10, data.num_examples(config, "validation") or 10)
  assert len(a) == -(-total // 4)
  for batch in a:
    _assert_batch(batch, 4)
    assert batch["weight"].dtype == np.float32 and batch["index"].dtype == np.int32
  weights = np.concatenate([x["weight"] for x in a])
  assert weights.sum() == total and (weights[:total] == 1).all()
  # The same example index gets the same hole in every split (eval_train vs eval).
  train = data.eval_batches(config, "train", 4, 4, process_index=0, process_count=1)
  np.testing.assert_array_equal(train[0]["mask"], a[0]["mask"])


def test_eval_batches_of_two_processes_partition_each_batch():
  config = _config(source="synthetic")
  whole = data.eval_batches(config, "validation", 20, 8, process_index=0, process_count=1)
  parts = [
    data.eval_batches(config, "validation", 20, 8, process_index=p, process_count=2) for p in (0, 1)
  ]
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key]
      )
  first = np.stack([synthetic.render(1, i) for i in range(8)])
  np.testing.assert_array_equal(whole[0]["image"], first)


def test_embedded_eval_train_is_not_augmented():
  config = _config(source="embedded")
  a = data.eval_batches(config, "train", 6, 6, process_index=0, process_count=1)[0]
  b = data.eval_batches(config, "train", 6, 6, process_index=0, process_count=1)[0]
  np.testing.assert_array_equal(a["image"], b["image"])
  val = data.eval_batches(config, "validation", 6, 6, process_index=0, process_count=1)[0]
  assert not set(_hashes(a["image"])) & set(_hashes(val["image"]))


def test_num_examples():
  assert data.num_examples(_config(source="embedded"), "train") is None
  assert data.num_examples(_config(source="synthetic"), "test") == synthetic.SIZES["test"]


def test_bad_arguments_fail_clearly(image_tree):
  with pytest.raises(ValueError, match="celeb_a, folder, embedded, synthetic"):
    data.create_train_iterator(_config(source="imagenet"), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="no split 'test'"):
    data.eval_batches(
      _config(source="folder", path=image_tree), "test", 4, 4, process_index=0, process_count=1
    )
  with pytest.raises(ValueError, match="not divisible"):
    data.create_train_iterator(_config(batch_size=6), process_index=0, process_count=4)


def test_celeb_a_through_the_pipeline_fails_fast(tmp_path):
  config = _config(source="celeb_a", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
  start = time.monotonic()
  with pytest.raises(data.DataUnavailableError, match="img_align_celeba.zip"):
    data.create_train_iterator(config, process_index=0, process_count=1)
  assert time.monotonic() - start < 10


def test_data_seed_is_32_bit():
  for seed in itertools.chain(range(5), [-1, 2**40]):
    assert 0 <= pipeline.data_seed(seed) < 2**32


def test_train_subset_is_fixed_nested_and_all_that_training_sees():
  config = _config(source="synthetic", flip=False, train_subset=8)
  evals = data.eval_batches(config, "train", 100, 8)
  assert sum(b["weight"].sum() for b in evals) == 8 and data.num_examples(config, "train") == 8
  subset = set(_hashes(evals[0]["image"]))
  seen = set(_hashes(np.concatenate([b["image"] for b in _take(
      data.create_train_iterator(config), 3)])))
  assert seen == subset  # 3 batches of 8 cover the 8 examples and nothing else
  config.data.train_subset, config.seed = 4, 1
  smaller = data.eval_batches(config, "train", 100, 4)[0]["image"]
  assert set(_hashes(smaller)) < subset  # the same order for every seed: 4 of the 8
  assert data.num_examples(config, "validation") == synthetic.SIZES["validation"]
