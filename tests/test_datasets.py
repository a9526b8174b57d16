"""Dataset parsers on generated trees: ids, cameras, relabelling, junk, times, errors."""

import hashlib
import math
import os
import re

import numpy as np
import pytest

from qaconv_jax.data.datasets import SPLIT_DIRS, DatasetError, load_dataset
from qaconv_jax.data.synthetic import write_market_tree
from qaconv_jax.data.timestamps import DUKE_OFFSETS, duke_time, market_session_offsets, market_time


def _touch(root, sub, names):
  os.makedirs(os.path.join(root, sub), exist_ok=True)
  for n in names:
    open(os.path.join(root, sub, n), "wb").close()


def _market_tree(root):
  _touch(
    root,
    "bounding_box_train",
    [
      "0007_c1s1_000100_01.jpg",
      "0003_c1s2_000500_01.jpg",
      "0003_c2s1_000050_02.jpg",
      "0007_c1s4_000100_01.jpg",
      "-1_c1s1_099999_01.jpg",
      "Thumbs.db",
    ],
  )
  _touch(root, "query", ["0010_c1s1_001000_00.jpg", "0011_c1s5_000010_00.jpg"])
  _touch(
    root,
    "bounding_box_test",
    ["0010_c2s1_000200_01.jpg", "0000_c1s1_000300_01.jpg", "-1_c2s3_777777_01.jpg"],
  )
  return root


def test_market_ids_cameras_junk_distractors(tmp_path):
  ds = load_dataset("market1501", _market_tree(str(tmp_path)))
  assert [(os.path.basename(r.path), r.pid, r.camera) for r in ds.train] == [
    ("0003_c1s2_000500_01.jpg", 0, 0),
    ("0003_c2s1_000050_02.jpg", 0, 1),
    ("0007_c1s1_000100_01.jpg", 1, 0),
    ("0007_c1s4_000100_01.jpg", 1, 0),
  ]
  assert ds.num_train_ids == 2
  assert sorted(r.pid for r in ds.query) == [10, 11]  # raw
  assert sorted(r.pid for r in ds.gallery) == [0, 10]  # distractor kept, junk dropped
  assert ds.has_time()


def test_market_time_offsets_with_quirk_and_empty_session(tmp_path):
  ds = load_dataset("market1501", _market_tree(str(tmp_path)))
  times = {os.path.basename(r.path): r.time for r in ds.train + ds.query + ds.gallery}
  # Camera 1: session 1 max 1000 (from query; junk 99999 ignored), session 2 max 500,
  # session 3 empty, session 4 max 100.
  # offsets: s1 0; s2 1000; s3 500 + 2*1000 = 2500; s4 = s3 (s3 empty) = 2500;
  # s5 = 100 + 2*2500 = 5100.
  assert times["0007_c1s1_000100_01.jpg"] == pytest.approx(100 / 25)
  assert times["0003_c1s2_000500_01.jpg"] == pytest.approx((500 + 1000) / 25)
  assert times["0007_c1s4_000100_01.jpg"] == pytest.approx((100 + 2500) / 25)
  assert times["0011_c1s5_000010_00.jpg"] == pytest.approx((10 + 5100) / 25)
  assert times["0010_c2s1_000200_01.jpg"] == pytest.approx(200 / 25)


def test_duke_offsets_and_fps(tmp_path):
  root = str(tmp_path)
  _touch(root, "bounding_box_train", ["0001_c2_f0046182.jpg", "0005_c8_f0000010.jpg"])
  _touch(root, "query", ["0002_c5_f0000100.jpg"])
  _touch(root, "bounding_box_test", ["0002_c1_f0000200.jpg", "-1_c1_f0000300.jpg"])
  ds = load_dataset("dukemtmc", root)
  assert [(r.pid, r.camera) for r in ds.train] == [(0, 1), (1, 7)]
  assert ds.train[0].time == pytest.approx((46182 + DUKE_OFFSETS[1]) / 59.94)
  assert ds.train[1].time == pytest.approx((10 + 46765) / 59.94)
  assert ds.query[0].time == pytest.approx(100 / 59.94)
  assert [r.pid for r in ds.gallery] == [2]


def test_msmt17_lists(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "train"))
  os.makedirs(os.path.join(root, "test"))
  with open(os.path.join(root, "list_train.txt"), "w") as f:
    f.write("0000/0000_000_01_0303morning_0015_0.jpg 0\n0005/0005_001_14_0303noon_0001_1.jpg 5\n")
  with open(os.path.join(root, "list_val.txt"), "w") as f:
    f.write("0002/0002_000_03_0303morning_0002_0.jpg 2\n\n")
  with open(os.path.join(root, "list_query.txt"), "w") as f:
    f.write("0100/0100_000_07_0303morning_0100_0.jpg 100\n")
  with open(os.path.join(root, "list_gallery.txt"), "w") as f:
    f.write("0100/0100_003_02_0303morning_0101_0.jpg 100\n")
  ds = load_dataset("msmt17", root)
  assert [(r.pid, r.camera) for r in ds.train] == [(0, 0), (2, 13), (1, 2)]
  assert ds.train[0].path == os.path.join(root, "train", "0000/0000_000_01_0303morning_0015_0.jpg")
  assert [(r.pid, r.camera) for r in ds.query + ds.gallery] == [(100, 6), (100, 1)]
  assert math.isnan(ds.query[0].time) and not ds.has_time()


@pytest.mark.parametrize("name", ["cuhk03_detected", "cuhk03_labeled"])
def test_cuhk03_png(tmp_path, name):
  root = str(tmp_path)
  _touch(root, "bounding_box_train", ["0001_c1_1.png", "0001_c2_3.png", "0004_c1_2.png"])
  _touch(root, "query", ["0010_c1_1.png"])
  _touch(root, "bounding_box_test", ["0010_c2_1.png"])
  ds = load_dataset(name, root)
  assert [(r.pid, r.camera) for r in ds.train] == [(0, 0), (0, 1), (1, 0)]
  assert math.isnan(ds.gallery[0].time)


def test_errors_name_the_problem(tmp_path):
  root = str(tmp_path)
  with pytest.raises(DatasetError, match="does not exist"):
    load_dataset("market1501", os.path.join(root, "nope"))
  with pytest.raises(DatasetError, match="unknown dataset 'market'"):
    load_dataset("market", root)
  _touch(root, "bounding_box_train", ["0001_c1s1_000001_01.jpg"])
  _touch(root, "query", ["0001_c2s1_000001_01.jpg"])
  with pytest.raises(DatasetError, match=r"missing folder .*bounding_box_test.*expected"):
    load_dataset("market1501", root)
  _touch(root, "bounding_box_test", ["-1_c1s1_000001_01.jpg"])
  with pytest.raises(DatasetError, match="gallery split .* no usable image"):
    load_dataset("market1501", root)
  _touch(root, "bounding_box_test", ["0001_c1s1_000001_01.jpg", "IMG_1234.jpg"])
  with pytest.raises(DatasetError, match=r"cannot parse image name .*IMG_1234.jpg.*0002_c1s1"):
    load_dataset("market1501", root)
  empty = os.path.join(root, "empty")
  _touch(empty, "bounding_box_train", [])
  with pytest.raises(DatasetError, match=r"no \*\.jpg images in .*bounding_box_train"):
    load_dataset("dukemtmc", empty)


def _msmt17_lists(root, line):
  """An MSMT17 layout (train/, test/) whose four list files each hold ``line``."""
  for d in ("train", "test"):
    os.makedirs(os.path.join(root, d))
  for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
    with open(os.path.join(root, name), "w") as f:
      f.write(line + "\n")


def test_msmt17_bad_line(tmp_path):
  root = str(tmp_path)
  _msmt17_lists(root, "0000/0000_000_01_x.jpg 0")
  with open(os.path.join(root, "list_val.txt"), "w") as f:
    f.write("0000/0000_000_01_x.jpg\n")
  with pytest.raises(DatasetError, match=r"list_val.txt:1: cannot parse"):
    load_dataset("msmt17", root)


def _tree_digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(dirpath, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_synthetic_tree_is_deterministic_and_parses(tmp_path):
  a1, a2, b = (str(tmp_path / n) for n in ("a1", "a2", "b"))
  counts = write_market_tree(a1, "a", num_ids=24, seed=3)
  write_market_tree(a2, "a", num_ids=24, seed=3)
  write_market_tree(b, "b", num_ids=24, seed=3)
  assert _tree_digest(a1) == _tree_digest(a2)
  assert _tree_digest(a1) != _tree_digest(b)
  ds = load_dataset("market1501", a1)
  assert ds.num_train_ids == 12 and ds.has_time() and ds.num_cameras <= 6
  assert len(ds.train) == counts["bounding_box_train"]
  gallery_pids = [r.pid for r in ds.gallery]
  assert 0 in gallery_pids  # distractors kept
  assert len(ds.gallery) < counts["bounding_box_test"]  # junk dropped
  # Every query has a true match in another camera of the gallery.
  for q in ds.query:
    assert any(g.pid == q.pid and g.camera != q.camera for g in ds.gallery)
  db = load_dataset("market1501", b)
  assert not {r.pid for r in ds.query} & {r.pid for r in db.query}


def test_synthetic_times_carry_group_cooccurrence(tmp_path):
  # Pairs of people seen within tau of each other in one camera are seen within tau in a
  # second camera far more often than random pairs seen in the same two cameras.
  root = str(tmp_path / "a")
  write_market_tree(root, "a", num_ids=300, seed=0)
  ds = load_dataset("market1501", root)
  seen = {}
  for r in ds.train:
    seen.setdefault(r.pid, {}).setdefault(r.camera, []).append(r.time)
  mid = {p: {c: float(np.mean(t)) for c, t in cams.items()} for p, cams in seen.items()}
  tau = 100.0
  together, apart = [], []
  pids = sorted(mid)
  for i, a in enumerate(pids):
    for b in pids[i + 1 :]:
      shared = sorted(set(mid[a]) & set(mid[b]))
      if len(shared) < 2:
        continue
      c1, c2 = shared[:2]
      near_c2 = abs(mid[a][c2] - mid[b][c2]) < tau
      (together if abs(mid[a][c1] - mid[b][c1]) < tau else apart).append(near_c2)
  assert len(together) >= 20, len(together)
  # (Measured: ~0.5 vs ~0.04; times without groups would give about equal rates.)
  assert np.mean(together) > 0.4 and np.mean(together) > 5 * np.mean(apart), (
    np.mean(together),
    np.mean(apart),
  )


def _folder_tree(root, ext, train="", query="", gallery=""):
  """A tree with one good image per split, plus the given names."""
  good = {"jpg": "0001_c1s1_000001_01.jpg", "png": "0001_c1_1.png"}[ext]
  for sub, extra in (
    ("bounding_box_train", train),
    ("query", query),
    ("bounding_box_test", gallery),
  ):
    _touch(root, sub, [good] + ([extra] if extra else []))
  return root


@pytest.mark.parametrize(
  "split,bad,what",
  [
    ("query", "0002_c0s1_000451_03.jpg", "camera 0 is outside market1501's cameras 1..6"),
    ("train", "0002_c7s1_000451_03.jpg", "camera 7 is outside market1501's cameras 1..6"),
    ("gallery", "0002_c1s0_000451_03.jpg", "session 0 is outside market1501's sessions 1..6"),
    ("gallery", "0002_c1s7_000451_03.jpg", "session 7 is outside market1501's sessions 1..6"),
    # Junk is checked too: a camera-0 name is malformed whatever its pid.
    ("gallery", "-1_c0s1_000451_03.jpg", "camera 0 is outside market1501's cameras 1..6"),
  ],
)
def test_market_names_outside_ranges_are_refused(tmp_path, split, bad, what):
  root = _folder_tree(str(tmp_path), "jpg", **{split: bad})
  sub = SPLIT_DIRS[split]
  with pytest.raises(DatasetError, match=re.escape(f"{os.path.join(root, sub, bad)}: {what}")):
    load_dataset("market1501", root)


@pytest.mark.parametrize(
  "bad,cam", [("0001_c0_f0000100.jpg", 0), ("0001_c9_f0000100.jpg", 9), ("-1_c0_f0000100.jpg", 0)]
)
def test_duke_cameras_outside_1_to_8_are_refused(tmp_path, bad, cam):
  root = str(tmp_path)
  _touch(root, "bounding_box_train", ["0001_c1_f0000001.jpg"])
  _touch(root, "query", ["0001_c2_f0000001.jpg", bad])
  _touch(root, "bounding_box_test", ["0001_c3_f0000001.jpg"])
  want = f"{os.path.join(root, 'query', bad)}: camera {cam} is outside dukemtmc's cameras 1..8"
  with pytest.raises(DatasetError, match=re.escape(want)):
    load_dataset("dukemtmc", root)


def test_cuhk03_camera_0_is_refused(tmp_path):
  root = _folder_tree(str(tmp_path), "png", "0002_c0_1.png")
  want = (
    f"{os.path.join(root, 'bounding_box_train', '0002_c0_1.png')}: camera 0 is outside "
    "cuhk03_labeled's cameras >= 1"
  )
  with pytest.raises(DatasetError, match=re.escape(want)):
    load_dataset("cuhk03_labeled", root)


@pytest.mark.parametrize("cam", ["00", "16"])
def test_msmt17_cameras_outside_1_to_15_are_refused(tmp_path, cam):
  root = str(tmp_path)
  _msmt17_lists(root, "0000/0000_000_01_0303morning_0015_0.jpg 0")
  with open(os.path.join(root, "list_query.txt"), "a") as f:
    f.write(f"0100/0100_000_{cam}_0303morning_0100_0.jpg 100\n")
  want = (
    f"{os.path.join(root, 'list_query.txt')}:2 "
    f"(0100/0100_000_{cam}_0303morning_0100_0.jpg): camera {int(cam)} is outside "
    "msmt17's cameras 1..15"
  )
  with pytest.raises(DatasetError, match=re.escape(want)):
    load_dataset("msmt17", root)


def test_time_functions_refuse_cameras_and_sessions_outside_their_tables():
  offsets = market_session_offsets([(1, 1, 100)])
  assert market_time(1, 6, 0, offsets) == 100 / 25  # offset 100 from session 1 on
  with pytest.raises(ValueError, match=r"session 0 is outside sessions 1\.\.6"):
    market_time(1, 0, 10, offsets)
  with pytest.raises(ValueError, match=r"session 7 is outside sessions 1\.\.6"):
    market_time(1, 7, 10, offsets)
  with pytest.raises(ValueError, match=r"camera 0 is outside cameras 1\.\.6"):
    market_time(0, 1, 10, offsets)
  with pytest.raises(ValueError, match=r"camera 2 has no session offsets.*cameras \[1\]"):
    market_time(2, 1, 10, offsets)
  assert duke_time(8, 0) == pytest.approx(DUKE_OFFSETS[7] / 59.94)
  for cam in (0, 9, -1):
    with pytest.raises(ValueError, match=rf"camera {cam} is outside cameras 1\.\.8"):
      duke_time(cam, 10)
