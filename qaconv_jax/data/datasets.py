"""Re-ID datasets in their standard folder layouts (docs/method.md §8).

``load_dataset(name, root)`` returns a ``ReidDataset`` whose ``train`` / ``query`` /
``gallery`` are lists of ``Record(path, pid, camera, time)``: junk (pid -1) dropped,
distractors (pid 0) kept, train pids relabelled 0..N-1 in sorted order, query/gallery pids
raw, cameras 0-based, times in seconds (NaN where the dataset has none).

``CombinedSource`` joins a dataset's train, query and gallery sources into one training set
(MSMT17-all, ``config.data.combine_all``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable

import numpy as np

from qaconv_jax.data import timestamps
from qaconv_jax.data.filenames import CUHK03_NAME, DUKE_NAME, MARKET_NAME, MSMT17_CAMERAS
from qaconv_jax.errors import ConfigError, DataError

SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MSMT_LISTS = {
  "train": ("list_train.txt", "list_val.txt"),
  "query": ("list_query.txt",),
  "gallery": ("list_gallery.txt",),
}


@dataclasses.dataclass(frozen=True)
class Record:
  path: str
  pid: int
  camera: int  # 0-based
  time: float  # seconds, NaN when unknown


@dataclasses.dataclass(frozen=True)
class ReidDataset:
  name: str
  root: str
  train: list[Record]
  query: list[Record]
  gallery: list[Record]

  @property
  def num_train_ids(self) -> int:
    return len({r.pid for r in self.train})

  @property
  def num_cameras(self) -> int:
    return 1 + max(r.camera for r in self.train + self.query + self.gallery)

  def has_time(self) -> bool:
    return not any(math.isnan(r.time) for r in self.query + self.gallery)


class DatasetError(DataError):
  """A dataset folder that does not have the expected layout or names."""


def _layout(name: str) -> str:
  if name == "msmt17":
    return (
      "<root>/train/, <root>/test/ and list_train.txt, list_val.txt, list_query.txt, "
      "list_gallery.txt (lines 'relative/path.jpg pid')"
    )
  ext = "png" if name.startswith("cuhk03") else "jpg"
  return (
    f"<root>/bounding_box_train/, <root>/bounding_box_test/, <root>/query/ holding *.{ext} images"
  )


def _list_images(folder: str, ext: str, name: str) -> list[str]:
  if not os.path.isdir(folder):
    raise DatasetError(f"{name}: missing folder {folder}; expected {_layout(name)}.")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(ext))
  if not files:
    raise DatasetError(f"{name}: no *{ext} images in {folder}; expected {_layout(name)}.")
  return files


def _match(pattern: re.Pattern, filename: str, folder: str, example: str) -> re.Match:
  m = pattern.match(filename)
  if m is None:
    raise DatasetError(
      f"cannot parse image name {os.path.join(folder, filename)}: expected names like {example}."
    )
  return m


def _check_range(
  where: str, what: str, value: int, name: str, low: int, high: int | None = None
) -> None:
  """Refuses ``value`` outside ``low..high`` (``high`` None: no upper bound).

  A camera 0 would silently become camera -1, and a camera or session beyond the tables in
  ``timestamps`` would pick a wrong offset, so malformed names stop here, named.
  """
  if value < low or (high is not None and value > high):
    expected = f"{low}..{high}" if high is not None else f">= {low}"
    raise DatasetError(
      f"cannot use image name {where}: {what} {value} is outside {name}'s {what}s {expected}."
    )


def _relabel(train: list[Record]) -> list[Record]:
  labels = {pid: i for i, pid in enumerate(sorted({r.pid for r in train}))}
  return [dataclasses.replace(r, pid=labels[r.pid]) for r in train]


def _market(root: str) -> dict[str, list[Record]]:
  parsed = {}
  for split, sub in SPLIT_DIRS.items():
    folder = os.path.join(root, sub)
    rows = []
    for f in _list_images(folder, ".jpg", "market1501"):
      m = _match(MARKET_NAME, f, folder, "0002_c1s1_000451_03.jpg")
      pid, cam, session, frame = (int(m.group(i)) for i in range(1, 5))
      # Junk included: a camera-0 file is malformed whatever its pid.
      where = os.path.join(folder, f)
      _check_range(where, "camera", cam, "market1501", 1, timestamps.MARKET_CAMERAS)
      _check_range(where, "session", session, "market1501", 1, timestamps.MARKET_SESSIONS)
      if pid != -1:
        rows.append((where, pid, cam, session, frame))
    parsed[split] = rows
  # Offsets from all three splits together, as the official code does.
  offsets = timestamps.market_session_offsets(
    (cam, session, frame) for rows in parsed.values() for _, _, cam, session, frame in rows
  )
  return {
    split: [
      Record(path, pid, cam - 1, timestamps.market_time(cam, session, frame, offsets))
      for path, pid, cam, session, frame in rows
    ]
    for split, rows in parsed.items()
  }


def _folder_splits(
  root: str,
  name: str,
  pattern: re.Pattern,
  ext: str,
  example: str,
  time_fn: Callable[[re.Match], float],
  max_camera: int | None,
) -> dict[str, list[Record]]:
  out = {}
  for split, sub in SPLIT_DIRS.items():
    folder = os.path.join(root, sub)
    records = []
    for f in _list_images(folder, ext, name):
      m = _match(pattern, f, folder, example)
      pid, cam = int(m.group(1)), int(m.group(2))
      _check_range(os.path.join(folder, f), "camera", cam, name, 1, max_camera)
      if pid != -1:
        records.append(Record(os.path.join(folder, f), pid, cam - 1, time_fn(m)))
    out[split] = records
  return out


def _duke(root: str) -> dict[str, list[Record]]:
  return _folder_splits(
    root,
    "dukemtmc",
    DUKE_NAME,
    ".jpg",
    "0001_c2_f0046182.jpg",
    lambda m: timestamps.duke_time(int(m.group(2)), int(m.group(3))),
    len(timestamps.DUKE_OFFSETS),
  )


def _cuhk03(name: str) -> Callable[[str], dict[str, list[Record]]]:
  return lambda root: _folder_splits(
    root, name, CUHK03_NAME, ".png", "0001_c1_1.png", lambda m: math.nan, None
  )


def _msmt17(root: str) -> dict[str, list[Record]]:
  out = {}
  for split, lists in MSMT_LISTS.items():
    folder = os.path.join(root, "train" if split == "train" else "test")
    if not os.path.isdir(folder):
      raise DatasetError(f"msmt17: missing folder {folder}; expected {_layout('msmt17')}.")
    records = []
    for list_name in lists:
      list_path = os.path.join(root, list_name)
      if not os.path.isfile(list_path):
        raise DatasetError(f"msmt17: missing list {list_path}; expected {_layout('msmt17')}.")
      with open(list_path) as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          parts = line.split()
          fields = os.path.basename(parts[0]).split("_")
          if (
            len(parts) != 2
            or len(fields) < 3
            or not fields[2].isdigit()
            or not parts[1].lstrip("-").isdigit()
          ):
            raise DatasetError(
              f"{list_path}:{line_no}: cannot parse {line.strip()!r}; expected "
              "'0000/0000_000_01_0303morning_0015_0.jpg 0'."
            )
          _check_range(
            f"{list_path}:{line_no} ({parts[0]})",
            "camera",
            int(fields[2]),
            "msmt17",
            1,
            MSMT17_CAMERAS,
          )
          records.append(
            Record(os.path.join(folder, parts[0]), int(parts[1]), int(fields[2]) - 1, math.nan)
          )
    if not records:
      raise DatasetError(f"msmt17: the {split} lists {lists} are empty.")
    out[split] = records
  return out


LOADERS: dict[str, Callable[[str], dict[str, list[Record]]]] = {
  "market1501": _market,
  "dukemtmc": _duke,
  "msmt17": _msmt17,
  "cuhk03_detected": _cuhk03("cuhk03_detected"),
  "cuhk03_labeled": _cuhk03("cuhk03_labeled"),
}


def load_dataset(name: str, root: str) -> ReidDataset:
  """Parses the dataset ``name`` (one of ``LOADERS``) in its own folder ``root``."""
  if name not in LOADERS:
    raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LOADERS)}.")
  if not os.path.isdir(root):
    raise DatasetError(f"{name}: dataset folder {root} does not exist; expected {_layout(name)}.")
  splits = LOADERS[name](root)
  for split, records in splits.items():
    if not records:
      raise DatasetError(
        f"{name}: the {split} split in {root} holds no usable image "
        f"(all junk?); expected {_layout(name)}."
      )
  return ReidDataset(name, root, _relabel(splits["train"]), splits["query"], splits["gallery"])


# The datasets whose test images may join training: the authors' --combine_all exists for
# MSMT17 only (reid/datasets/msmt.py); their market.py and cuhk.py assert it is off.
COMBINE_ALL = ("msmt17",)


def check_combine_all(dataset: str, combine_all: bool) -> None:
  """Raises `ConfigError` when ``combine_all`` is asked of a dataset not in `COMBINE_ALL`."""
  if combine_all and dataset not in COMBINE_ALL:
    raise ConfigError(
      f"data.combine_all=True with data.dataset={dataset!r}: combining train, query and "
      "gallery for training is defined for msmt17 only (MSMT17-all, as the authors' "
      "--combine_all in reid/datasets/msmt.py)."
    )


class CombinedSource:
  """Train + query + gallery of one dataset as one training source (MSMT17-all).

  Images in that order. ``pids [N_train + N_query + N_gallery]``: the training ids
  relabelled ``0..N-1`` (sorted), then the test ids of query and gallery together relabelled
  ``N..N+M-1`` (sorted), so a query and a gallery image of one person share an id. The
  authors add the number of training ids to the raw test ids (reid/datasets/msmt.py); on
  MSMT17, whose ids run 0..1040 and 0..3059, that is the same labelling, 4,101 classes.
  ``cameras``, ``times`` and ``names`` are carried through; ``[i]`` is the part's item with
  its ``"pid"`` relabelled. Any sources with the interface of ``pipeline.FolderSource``
  (``pids``, ``cameras``, ``times``, ``names``, ``len``, ``[i]``) work.
  """

  def __init__(self, train, query, gallery):
    self.parts = (train, query, gallery)
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # [4]
    train_raw, train_ids = np.unique(np.asarray(train.pids), return_inverse=True)
    test_pids = np.concatenate([np.asarray(query.pids), np.asarray(gallery.pids)])
    _, test_ids = np.unique(test_pids, return_inverse=True)
    self.pids = np.concatenate([train_ids, test_ids + len(train_raw)]).astype(np.int64)
    self.cameras = np.concatenate([np.asarray(p.cameras) for p in self.parts]).astype(np.int64)
    self.times = np.concatenate([np.asarray(p.times) for p in self.parts]).astype(np.float64)
    self.names = [n for p in self.parts for n in p.names]

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} outside a combined source of {len(self)} images.")
    part = int(np.searchsorted(self.starts, i, side="right")) - 1
    ex = self.parts[part][i - int(self.starts[part])]
    return {**ex, "pid": int(self.pids[i])}
