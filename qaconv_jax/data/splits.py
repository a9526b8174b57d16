"""Subsets of a source: the validation split held out from the training identities, and the
check that training labels are the contiguous class ids the class memory is indexed by.

Model selection must never look at a test set (docs/method.md §5): `holdout_identities`
sets aside whole training identities, seeded, and turns their images into a query / gallery
split evaluated under the same protocol as a test set.
"""

from __future__ import annotations

import numpy as np

from qaconv_jax.errors import ConfigError, DataError


def check_val_ids(val_ids: float) -> None:
  """Raises `ConfigError` unless ``val_ids`` is 0, a count >= 1 or a fraction in (0, 1)."""
  if not (val_ids == 0 or 0 < val_ids < 1 or (float(val_ids).is_integer() and val_ids >= 1)):
    raise ConfigError(
      f"data.val_ids={val_ids!r}: expected 0 (no validation split), a count "
      ">= 1 or a fraction in (0, 1) of the training identities."
    )


def num_holdout(num_ids: int, val_ids: float) -> int:
  """``config.data.val_ids`` -> identities to hold out: an int >= 1 is a count, a float in
  (0, 1) a fraction of ``num_ids`` (rounded, at least 1), 0 none."""
  check_val_ids(val_ids)
  if val_ids == 0:
    return 0
  n = max(1, int(round(val_ids * num_ids))) if val_ids < 1 else int(val_ids)
  if n > num_ids - 2:
    raise ConfigError(
      f"data.val_ids={val_ids!r} holds out {n} of {num_ids} training "
      "identities; at least 2 must remain to train on."
    )
  return n


def holdout_identities(pids: np.ndarray, cameras: np.ndarray, val_ids: float, seed: int):
  """Splits a training set's images into ``(train, query, gallery)`` index arrays.

  ``num_holdout(len(unique(pids)), val_ids)`` identities, drawn by a permutation seeded with
  ``seed``, are held out. Of each held-out identity, one image per camera (a seeded choice)
  is a query and every other image is gallery, so every query with images of its identity
  in another camera has positives under the Market protocol. ``train`` keeps the other
  identities' images, in source order. All three are sorted int64 arrays over ``[0, n)``.
  """
  pids, cameras = np.asarray(pids), np.asarray(cameras)
  ids = np.unique(pids)
  n = num_holdout(len(ids), val_ids)
  rng = np.random.default_rng([seed, 3])
  held = np.sort(rng.permutation(ids)[:n])
  is_val = np.isin(pids, held)
  val = np.flatnonzero(is_val)
  # One query per (identity, camera): the first of each group after a seeded shuffle.
  shuffled = val[rng.permutation(len(val))]
  _, first = np.unique(
    np.stack([pids[shuffled], cameras[shuffled]], axis=1), axis=0, return_index=True
  )
  query = np.sort(shuffled[first])
  gallery = np.setdiff1d(val, query)
  return np.flatnonzero(~is_val), query, gallery


class Subset:
  """The images ``indices`` of ``source``, with training ids relabelled ``0..C-1`` (in
  sorted order of the original ids) when ``relabel``; same interface as the sources
  (``pids``, ``cameras``, ``times``, ``names``, ``len``, ``[i]``)."""

  def __init__(self, source, indices: np.ndarray, relabel: bool):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    pids = np.asarray(source.pids)[self.indices]
    if relabel:
      ids, pids = np.unique(pids, return_inverse=True)
      self._label = dict(zip(ids.tolist(), range(len(ids))))
    else:
      self._label = None
    self.pids = pids.astype(np.int64)
    self.cameras = np.asarray(source.cameras)[self.indices]
    self.times = np.asarray(source.times)[self.indices]
    self.names = [source.names[i] for i in self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    ex = self.source[int(self.indices[i])]
    if self._label is not None:
      ex = {**ex, "pid": self._label[int(ex["pid"])]}
    return ex


def train_and_validation(source, data_cfg):
  """``(train source, (query, gallery) or None)``: with ``data_cfg.val_ids`` the held-out
  identities' query / gallery (`holdout_identities`, seeded by ``data_cfg.val_seed``) and the
  others relabelled ``0..C-1``; without, ``source`` itself."""
  if not data_cfg.val_ids:
    return source, None
  train, query, gallery = holdout_identities(
    source.pids, source.cameras, data_cfg.val_ids, data_cfg.val_seed
  )
  # A query counts when its identity has a gallery image from another camera (the protocol
  # drops same-camera ones): without any, validation could only fail later, mid-training.
  pids, cams = np.asarray(source.pids), np.asarray(source.cameras)
  valid = [np.any((pids[gallery] == pids[q]) & (cams[gallery] != cams[q])) for q in query.tolist()]
  if not any(valid):
    raise ConfigError(
      f"data.val_ids={data_cfg.val_ids!r} (val_seed={data_cfg.val_seed}) held out "
      f"{len(np.unique(pids[query]))} identities with no image pair across two cameras, so "
      "the validation split has no usable query; hold out more identities or pick another "
      "val_seed."
    )
  return Subset(source, train, relabel=True), (
    Subset(source, query, relabel=False),
    Subset(source, gallery, relabel=False),
  )


def check_class_ids(pids: np.ndarray, where: str) -> int:
  """Raises `DataError` unless the training ids are exactly ``0..C-1``; returns C.

  The class memory has one row per id and the loss indexes it by label: an id outside the
  range would get no positive and never be written, a gap would be a class never seen.
  """
  pids = np.asarray(pids)
  ids = np.unique(pids)
  if len(ids) == 0:
    raise DataError(f"{where}: no training images.")
  if ids[0] != 0 or ids[-1] != len(ids) - 1:
    missing = np.setdiff1d(np.arange(int(ids[-1]) + 1), ids)[:5].tolist()
    raise DataError(
      f"{where}: training ids must be the contiguous class ids 0..{len(ids) - 1} (one per "
      f"identity, as the dataset loaders relabel them); found {len(ids)} ids from "
      f"{int(ids[0])} to {int(ids[-1])}" + (f", missing {missing}" if missing else "") + "."
    )
  return len(ids)


def check_labels(labels: np.ndarray, num_classes: int, step: int) -> None:
  """Raises `DataError` if a batch holds a label outside ``[0, num_classes)``."""
  labels = np.asarray(labels)
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise DataError(
      f"step {step}: training labels {np.unique(bad)[:5].tolist()} are outside "
      f"[0, {num_classes}) (the class memory's rows)."
    )
