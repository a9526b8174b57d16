"""MSMT17-all (``config.data.combine_all``): train + val + query + gallery as one training
source, raw folders and prepared TFDS alike (docs/method.md §8)."""

import os

import numpy as np
import pytest

from qaconv_jax.data.datasets import load_dataset
from tests.test_datasets import _market_tree

# Raw MSMT17 ids: training 0, 3, 7 (the loader relabels them 0..2), test 5, 9, 12 (query and
# gallery share 5 and 9). Combined: 0..2, then 5 -> 3, 9 -> 4, 12 -> 5.
_MSMT_LISTS = {
  "list_train.txt": [
    ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
    ("0007/0007_004_09_0303noon_0100_0.jpg", 7),
    ("0000/0000_001_02_0303morning_0016_0.jpg", 0),
  ],
  "list_val.txt": [("0003/0003_000_05_0303noon_0004_0.jpg", 3)],
  "list_query.txt": [
    ("0009/0009_000_03_0304morning_0200_0.jpg", 9),
    ("0005/0005_000_07_0304noon_0300_0.jpg", 5),
  ],
  "list_gallery.txt": [
    ("0012/0012_000_11_0304morning_0400_0.jpg", 12),
    ("0005/0005_001_15_0304noon_0301_0.jpg", 5),
    ("0009/0009_001_01_0304noon_0201_0.jpg", 9),
  ],
}


def _msmt17_tree(root):
  """A tiny MSMT17 tree of real JPEGs, each a distinct flat colour."""
  from PIL import Image

  for k, (list_name, rows) in enumerate(_MSMT_LISTS.items()):
    folder = os.path.join(
      root, "test" if list_name in ("list_query.txt", "list_gallery.txt") else "train"
    )
    for j, (rel, _) in enumerate(rows):
      os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
      Image.new("RGB", (16, 32), (40 * k, 60 * j, 200)).save(os.path.join(folder, rel))
    with open(os.path.join(root, list_name), "w") as f:
      f.writelines(f"{rel} {pid}\n" for rel, pid in rows)
  return root


def _check_combined(src, ds, root):
  """``src``: the combined source of the loaded MSMT17 ``ds`` (raw folder or prepared)."""
  from qaconv_jax.data.augment import decode
  from qaconv_jax.data.splits import check_class_ids

  n_train, n_query = len(ds.train), len(ds.query)
  assert len(src) == n_train + n_query + len(ds.gallery) == 9
  assert len(src.names) == len(src.cameras) == len(src.times) == len(src.pids) == 9
  assert src.pids.dtype == src.cameras.dtype == np.int64 and src.times.dtype == np.float64
  assert check_class_ids(src.pids, "msmt17-all") == 6  # 3 training + 3 test identities
  np.testing.assert_array_equal(src.pids[:n_train], [r.pid for r in ds.train])
  test_ids = {5: 3, 9: 4, 12: 5}
  np.testing.assert_array_equal(
    src.pids[n_train:], [test_ids[r.pid] for r in ds.query + ds.gallery]
  )
  # A query and a gallery image of one person share the new id.
  assert src.pids[n_train + 1] == src.pids[n_train + n_query + 1] == 3
  records = ds.train + ds.query + ds.gallery
  np.testing.assert_array_equal(src.cameras, [r.camera for r in records])
  assert np.isnan(src.times).all()
  assert [os.path.relpath(os.path.join(root, n), root) for n in src.names] == [
    os.path.relpath(r.path, root) for r in records
  ]
  for i, r in enumerate(records):
    ex = src[i]
    assert set(ex) == {"image", "pid", "camera", "time", "where"}
    assert (ex["pid"], ex["camera"]) == (src.pids[i], r.camera) and ex["where"] == src.names[i]
    with open(r.path, "rb") as f:
      assert bytes(ex["image"]) == f.read()  # the encoded file, untouched
    assert decode(ex["image"], ex["where"]).size == (16, 32)
  with pytest.raises(IndexError):
    src[9]


def test_msmt17_combine_all_raw_folder(tmp_path):
  import ml_collections

  from qaconv_jax.data.datasets import CombinedSource
  from qaconv_jax.data.pipeline import FolderSource, open_source

  root = _msmt17_tree(str(tmp_path / "msmt17"))
  ds = load_dataset("msmt17", root)
  cfg = ml_collections.ConfigDict(dict(dataset="msmt17", root=root, tfds_dir="", combine_all=True))
  src = open_source(cfg, "train")
  assert isinstance(src, CombinedSource)
  _check_combined(src, ds, root)
  # The test sets are unaffected: raw ids, their own images only.
  query = open_source(cfg, "query")
  assert isinstance(query, FolderSource) and query.pids.tolist() == [9, 5]
  cfg.combine_all = False
  assert len(open_source(cfg, "train")) == len(ds.train) == 4


def test_msmt17_combine_all_prepared(tmp_path):
  import ml_collections

  from qaconv_jax.data.pipeline import open_source
  from qaconv_jax.data.tfds_builders import prepare

  root = _msmt17_tree(str(tmp_path / "msmt17"))
  prepare("msmt17", root, str(tmp_path / "tfds"))
  cfg = ml_collections.ConfigDict(
    dict(dataset="msmt17", root="", tfds_dir=str(tmp_path / "tfds"), combine_all=True)
  )
  _check_combined(open_source(cfg, "train"), load_dataset("msmt17", root), root)
  assert open_source(cfg, "gallery").pids.tolist() == [12, 5, 9]


def test_combine_all_is_msmt17_only(tmp_path):
  import ml_collections

  from qaconv_jax.data.pipeline import open_source
  from qaconv_jax.errors import ConfigError

  root = _market_tree(str(tmp_path))
  cfg = ml_collections.ConfigDict(
    dict(dataset="market1501", root=root, tfds_dir="", combine_all=True)
  )
  with pytest.raises(ConfigError, match=r"data.combine_all=True with data.dataset='market1501'"):
    open_source(cfg, "train")
  assert len(open_source(cfg, "query")) == 2  # test sets never combine
