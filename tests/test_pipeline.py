"""grain pipeline: P x K batches, determinism, exact resume, host slices, eval padding, TFDS."""

import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qaconv_jax.data.augment import ImageDecodeError, augment, decode, random_occlusion
from qaconv_jax.data.datasets import load_dataset
from qaconv_jax.data.pipeline import (
  EpochOrder,
  FolderSource,
  eval_image,
  iterate,
  steps_per_epoch,
  train_dataset,
)
from qaconv_jax.data.synthetic import write_market_tree

SIZE = (64, 32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn") / "a")
  write_market_tree(root, "a", num_ids=24, seed=1)
  return root


@pytest.fixture(scope="module")
def source(tree):
  return FolderSource(load_dataset("market1501", tree).train)


def _cfg(**kw):
  base = dict(image_size=SIZE, batch_size=8, sampler="pk", pk_k=2, augment="v1.2")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_pk_batches_hold_p_ids_times_k_images(source):
  cfg = _cfg(batch_size=12, pk_k=3)
  it = iterate(train_dataset(source, cfg, seed=0, num_epochs=2))
  for batch in _take(it, 2 * steps_per_epoch(source, cfg)):
    ids, counts = np.unique(batch["label"], return_counts=True)
    assert len(ids) == 4 and (counts == 3).all()
    assert batch["image"].shape == (12, *SIZE, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_epoch_order_covers_every_index_once_per_epoch():
  order = EpochOrder(10, 4, num_epochs=2, seed=5)
  assert len(order) == 16
  for e in range(2):
    seen = [order[e * 8 + i] for i in range(8)]
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))
  assert [order[i] for i in range(8)] != [order[8 + i] for i in range(8)]


@pytest.mark.parametrize("sampler", ["pk", "shuffle"])
def test_deterministic_and_exact_resume(source, sampler):
  cfg = _cfg(sampler=sampler)
  first = _take(iterate(train_dataset(source, cfg, seed=7, num_epochs=3)), 5)
  again = _take(iterate(train_dataset(source, cfg, seed=7, num_epochs=3)), 5)
  for a, b in zip(first, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other = next(iterate(train_dataset(source, cfg, seed=8, num_epochs=3)))
  assert not np.array_equal(other["image"], first[0]["image"])

  # Training resumes after n steps by slicing at n; crossing an epoch boundary too.
  per_epoch = len(train_dataset(source, cfg, seed=7, num_epochs=1))
  for n in (3, per_epoch - 1):
    whole = _take(iterate(train_dataset(source, cfg, seed=7, num_epochs=3)), n + 2)
    resumed = _take(iterate(train_dataset(source, cfg, seed=7, num_epochs=3)[n:]), 2)
    for a, b in zip(whole[n:], resumed):
      assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_by_slicing_on_another_host_count(source):
  # After n global batches on 1 host, 2 hosts slicing at n read the rest of the same batches.
  cfg = _cfg()
  whole = _take(iterate(train_dataset(source, cfg, seed=3, num_epochs=2)), 4)
  for h in range(2):
    part = _take(
      iterate(train_dataset(source, cfg, seed=3, num_epochs=2, host=h, num_hosts=2)[2:]), 2
    )
    for step in range(2):
      half = len(whole[2 + step]["label"]) // 2
      np.testing.assert_array_equal(
        part[step]["image"], whole[2 + step]["image"][h * half : (h + 1) * half]
      )


def test_hosts_read_disjoint_slices_of_the_same_global_batch(source):
  cfg = _cfg()
  whole = _take(iterate(train_dataset(source, cfg, seed=3, num_epochs=1)), 2)
  parts = [
    _take(iterate(train_dataset(source, cfg, seed=3, num_epochs=1, host=h, num_hosts=2)), 2)
    for h in range(2)
  ]
  for step in range(2):
    for k in whole[step]:
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k]
      )


def test_augmentations_shapes_and_ranges(tree):
  path = sorted(os.listdir(os.path.join(tree, "query")))[0]
  with open(os.path.join(tree, "query", path), "rb") as f:
    img = decode(f.read(), path)
  rng = np.random.default_rng(0)
  plain = augment(img, (384, 128), "none", None)
  assert plain.shape == (384, 128, 3) and plain.dtype == np.uint8
  for kind in ("v1.0", "v1.2"):
    outs = [augment(img, (384, 128), kind, rng) for _ in range(4)]
    assert all(o.shape == (384, 128, 3) and o.dtype == np.uint8 for o in outs)
    assert not np.array_equal(outs[0], outs[1])  # random per call
  with pytest.raises(ValueError, match="unknown augmentation"):
    augment(img, SIZE, "v9", rng)


def test_random_occlusion_is_one_white_square():
  rng = np.random.default_rng(0)
  sides = []
  for _ in range(300):
    out = random_occlusion(np.zeros((384, 128, 3), np.uint8), rng)
    rows, cols = np.nonzero((out == 255).all(-1))
    side = rows.max() - rows.min() + 1
    assert cols.max() - cols.min() + 1 == side and len(rows) == side * side
    sides.append(side)
  assert min(sides) >= 1 and max(sides) <= 101 and max(sides) > 90  # U{1..101} at 384x128


def test_v1_0_flips_about_half_the_time():
  img = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (64, 1, 3)))
  flipped = 0
  for s in range(200):
    out = augment(img, SIZE, "v1.0", np.random.default_rng(s)).astype(int)
    # The occluder is white; compare on a column that survives: left vs right gradient sign.
    row = out[np.argmin((out == 255).all(-1).sum(1))]  # the least occluded row
    flipped += row[0, 0] > row[-1, 0]
  assert 70 < flipped < 130


def test_corrupt_image_names_the_file(tmp_path, tree):
  ds = load_dataset("market1501", tree)
  bad = str(tmp_path / "0001_c1s1_000001_01.jpg")
  with open(bad, "wb") as f:
    f.write(b"not a jpeg")
  src = FolderSource([ds.query[0].__class__(bad, 1, 0, 0.0)])
  with pytest.raises(ImageDecodeError, match="0001_c1s1_000001_01.jpg"):
    eval_image(src, 0, SIZE)


def test_tfds_prepare_and_read_back_without_tensorflow(tmp_path, tree):
  from qaconv_jax.data.tfds_builders import TfdsSource, prepare

  prepare("market1501", tree, str(tmp_path / "tfds"))
  ds = load_dataset("market1501", tree)
  for split in ("train", "query", "gallery"):
    src = TfdsSource("market1501", split, str(tmp_path / "tfds"))
    records = getattr(ds, split)
    want = {os.path.relpath(r.path, tree): (r.pid, r.camera, r.time) for r in records}
    got = {}
    for i in range(len(src)):
      ex = src[i]
      got[ex["where"]] = (ex["pid"], ex["camera"], ex["time"])
    assert got == want  # times too, bit for bit (stored as float64)
    np.testing.assert_array_equal(src.times, [r.time for r in records])
  ex = src[0]
  with open(os.path.join(tree, ex["where"]), "rb") as f:
    assert ex["image"] == f.read()  # the encoded file, untouched
  assert eval_image(src, 0, SIZE).shape == (*SIZE, 3)
  assert "tensorflow" not in sys.modules


def test_open_source_from_config(tmp_path, tree):
  from qaconv_jax.data.pipeline import open_source
  from qaconv_jax.data.tfds_builders import prepare

  cfg = ml_collections.ConfigDict(dict(dataset="market1501", root=tree, tfds_dir=""))
  raw = open_source(cfg, "query")
  prepare("market1501", tree, str(tmp_path))
  cfg.tfds_dir = str(tmp_path)
  prepared = open_source(cfg, "query")
  assert len(raw) == len(prepared) > 0
  assert sorted(raw.pids.tolist()) == sorted(prepared.pids.tolist())
  with pytest.raises(ValueError, match="set config.data.root"):
    open_source(
      ml_collections.ConfigDict(dict(dataset="market1501", root="", tfds_dir="")), "train"
    )


def test_tfds_unprepared_dir_says_how_to_prepare(tmp_path):
  from qaconv_jax.data.tfds_builders import TfdsSource

  with pytest.raises(FileNotFoundError, match="qaconv_jax.data.prepare --dataset market1501"):
    TfdsSource("market1501", "train", str(tmp_path))
