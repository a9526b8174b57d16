"""TFDS preparation: float64 times, metadata read without the images, version and
consistency errors that say to prepare again."""

import json
import os
import shutil

import numpy as np
import pytest

from qaconv_jax.data.datasets import load_dataset
from qaconv_jax.data.synthetic import write_market_tree
from qaconv_jax.data.tfds_builders import BUILDERS, TfdsSource, prepare

VERSION = str(BUILDERS["market1501"].VERSION)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """``(tree, data_dir)``: a synthetic Market tree and its TFDS preparation."""
  base = tmp_path_factory.mktemp("tfds")
  tree = str(base / "tree")
  write_market_tree(tree, "a", num_ids=12, seed=2)
  data_dir = str(base / "prepared")
  prepare("market1501", tree, data_dir)
  return tree, data_dir


def _copy(prepared, tmp_path):
  data_dir = str(tmp_path / "prepared")
  shutil.copytree(os.path.join(prepared[1], "market1501"), os.path.join(data_dir, "market1501"))
  return data_dir


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_metadata_matches_the_folders_bit_for_bit(prepared, split):
  tree, data_dir = prepared
  records = getattr(load_dataset("market1501", tree), split)
  src = TfdsSource("market1501", split, data_dir)
  want_times = np.array([r.time for r in records], np.float64)
  # The tree's times need float64 (frame / 25), so float32 storage would fail below.
  assert (want_times.astype(np.float32).astype(np.float64) != want_times).any()
  assert src.times.dtype == np.float64 and src.pids.dtype == src.cameras.dtype == np.int64
  np.testing.assert_array_equal(src.times, want_times)
  np.testing.assert_array_equal(src.pids, [r.pid for r in records])
  np.testing.assert_array_equal(src.cameras, [r.camera for r in records])
  assert src.names == [os.path.relpath(r.path, tree) for r in records]
  # Records are in generation order, so index i is the metadata's i-th entry.
  for i in (0, len(src) // 3, len(src) - 1):
    ex = src[i]
    assert ex["time"] == want_times[i] and ex["where"] == src.names[i]
    assert (ex["pid"], ex["camera"]) == (src.pids[i], src.cameras[i])


def test_metadata_is_read_without_the_records(prepared, monkeypatch):
  from tensorflow_datasets.core.data_sources import base

  reads = []
  get_one, get_many = base.BaseDataSource.__getitem__, base.BaseDataSource.__getitems__
  monkeypatch.setattr(
    base.BaseDataSource, "__getitem__", lambda self, i: reads.append(i) or get_one(self, i)
  )
  monkeypatch.setattr(
    base.BaseDataSource,
    "__getitems__",
    lambda self, keys: reads.extend(keys) or get_many(self, keys),
  )
  src = TfdsSource("market1501", "train", prepared[1])
  n = len(src)
  assert n > 10
  assert sorted(reads) == [0, n // 2, n - 1]  # only the spot checks


def test_older_version_says_prepare_again(prepared, tmp_path):
  data_dir = _copy(prepared, tmp_path)
  os.rename(
    os.path.join(data_dir, "market1501", VERSION), os.path.join(data_dir, "market1501", "1.0.0")
  )
  with pytest.raises(
    FileNotFoundError,
    match=r"prepared by an older version of its builder "
    r"\(1\.0\.0\).*prepare it again with the same command: python -m "
    r"qaconv_jax\.data\.prepare --dataset market1501",
  ):
    TfdsSource("market1501", "query", data_dir)


@pytest.mark.parametrize("change", ["pid", "length", "missing"])
def test_inconsistent_metadata_says_prepare_again(prepared, tmp_path, change):
  data_dir = _copy(prepared, tmp_path)
  path = os.path.join(data_dir, "market1501", VERSION, "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  gallery = meta["gallery"]
  if change == "pid":
    gallery["pid"][-1] += 1
  elif change == "length":
    gallery["camera"] = gallery["camera"][:-1]
  else:
    del meta["gallery"]
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(
    ValueError,
    match=r"prepared market1501 dataset in .* is inconsistent; "
    r"prepare it again: python -m qaconv_jax\.data\.prepare",
  ):
    TfdsSource("market1501", "gallery", data_dir)
  TfdsSource("market1501", "query", data_dir)  # the untouched split still opens
