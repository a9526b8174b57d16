"""The validation split held out from the training identities, and the class-id checks."""

import numpy as np
import pytest

from qaconv_jax.data.splits import (
  Subset,
  check_class_ids,
  check_labels,
  holdout_identities,
  num_holdout,
)
from qaconv_jax.errors import ConfigError, DataError


class _Source:
  def __init__(self, pids, cameras):
    self.pids, self.cameras = np.asarray(pids), np.asarray(cameras)
    self.times = np.arange(len(self.pids), dtype=np.float64)
    self.names = [f"img{i}" for i in range(len(self.pids))]

  def __len__(self):
    return len(self.pids)

  def __getitem__(self, i):
    return {"pid": int(self.pids[i]), "camera": int(self.cameras[i]), "where": self.names[i]}


def _toy(rng, num_ids=20, per_id=9, num_cams=3):
  pids = np.repeat(np.arange(num_ids), per_id)
  cams = rng.integers(0, num_cams, size=len(pids))
  order = rng.permutation(len(pids))  # images of an identity are not contiguous
  return pids[order], cams[order]


@pytest.mark.parametrize("val_ids, expected", [(5, 5), (5.0, 5), (0.25, 5), (0.01, 1), (0, 0)])
def test_counts_and_fractions(val_ids, expected):
  assert num_holdout(20, val_ids) == expected


@pytest.mark.parametrize(
  "val_ids, message",
  [
    (-1, r"val_ids=-1: expected 0 \(no validation split\), a count >= 1 or a fraction"),
    (2.5, r"val_ids=2.5: expected 0"),
    (19, r"val_ids=19 holds out 19 of 20 training identities; at least 2 must remain"),
  ],
)
def test_bad_val_ids_are_refused_by_name(val_ids, message):
  with pytest.raises(ConfigError, match=message):
    num_holdout(20, val_ids)


def test_holdout_is_disjoint_seeded_and_one_query_per_identity_camera(rng):
  pids, cams = _toy(rng)
  train, query, gallery = holdout_identities(pids, cams, 0.25, seed=7)
  # Every image lands in exactly one part; identities never straddle train and validation.
  assert np.array_equal(np.sort(np.concatenate([train, query, gallery])), np.arange(len(pids)))
  held = np.unique(pids[query])
  assert len(held) == 5 and set(np.unique(pids[gallery])) <= set(held)
  assert not set(pids[train]) & set(held)
  # One query per (identity, camera) the identity appears in, the rest gallery.
  pairs = {(p, c) for p, c in zip(pids[np.isin(pids, held)], cams[np.isin(pids, held)])}
  assert sorted(zip(pids[query], cams[query])) == sorted(pairs)
  # Same seed, same split; another seed, other identities.
  again = holdout_identities(pids, cams, 0.25, seed=7)
  assert all(np.array_equal(a, b) for a, b in zip(again, (train, query, gallery)))
  other = holdout_identities(pids, cams, 0.25, seed=8)
  assert not np.array_equal(np.unique(pids[other[1]]), held)


def test_subset_relabels_training_ids_contiguously(rng):
  pids, cams = _toy(rng)
  src = _Source(pids, cams)
  train, query, _ = holdout_identities(pids, cams, 5, seed=0)
  sub = Subset(src, train, relabel=True)
  assert check_class_ids(sub.pids, "train") == 15
  for i in (0, 7, len(sub) - 1):  # item labels agree with the pids array, cameras kept
    assert sub[i]["pid"] == sub.pids[i] and sub[i]["camera"] == cams[train[i]]
  # Relabelling keeps the identities' order: the k-th smallest original id becomes k.
  originals = np.unique(pids[train])
  np.testing.assert_array_equal(originals[sub.pids], pids[train])
  q = Subset(src, query, relabel=False)
  np.testing.assert_array_equal(q.pids, pids[query])
  assert q.names == [src.names[i] for i in query]


@pytest.mark.parametrize(
  "pids, message",
  [
    ([0, 1, 5, 5], r"contiguous class ids 0..2 .* found 3 ids from 0 to 5, missing \[2, 3, 4\]"),
    ([1, 2, 3], r"found 3 ids from 1 to 3, missing \[0\]"),
    ([-1, 0, 1], r"found 3 ids from -1 to 1\."),
  ],
)
def test_non_contiguous_class_ids_are_refused(pids, message):
  with pytest.raises(DataError, match=message):
    check_class_ids(np.array(pids), "market1501 training set")


def test_a_validation_split_without_cross_camera_pairs_is_refused():
  import ml_collections

  from qaconv_jax.data.splits import train_and_validation

  pids = np.repeat(np.arange(10), 4)
  cams = np.repeat(np.arange(10) % 3, 4)  # every identity seen by one camera only
  cfg = ml_collections.ConfigDict(dict(val_ids=2.0, val_seed=0))
  with pytest.raises(
    ConfigError,
    match=r"val_ids=2.0 \(val_seed=0\) held out 2 identities "
    r"with no image pair across two cameras",
  ):
    train_and_validation(_Source(pids, cams), cfg)
  cams[::2] = 3  # now every identity has a second camera
  train, (query, gallery) = train_and_validation(_Source(pids, cams), cfg)
  assert len(train) == 32 and len(query) == 4 and len(gallery) == 4


def test_labels_outside_the_memory_are_refused():
  check_labels(np.array([0, 3, 9]), 10, step=1)
  with pytest.raises(DataError, match=r"step 4: training labels \[-1, 10\] are outside \[0, 10\)"):
    check_labels(np.array([0, 10, -1, 3]), 10, step=4)
