"""TLift against a per-probe loop written from docs/method.md §7."""

import numpy as np
import pytest

from qaconv_jax.evaluation.tlift import temporal_lift


def tlift_ref(score, qc, qt, gc, gt, tau, sigma, k, alpha):
  score = score.astype(np.float64)
  out = np.zeros_like(score)
  for i in range(score.shape[0]):
    block_rows = np.flatnonzero((qc == qc[i]) & (np.abs(qt - qt[i]) < tau))
    for cam in np.unique(gc):
      cols = np.flatnonzero(gc == cam)
      block = score[np.ix_(block_rows, cols)]
      vals = np.sort(block.ravel())[::-1]
      thr = vals[k - 1] if vals.size > k else -np.inf
      _, pivot_cols = np.nonzero(block >= thr)  # duplicates counted
      pivot_times = gt[cols[pivot_cols]]
      for x in cols:
        w = np.mean(np.exp(-((pivot_times - gt[x]) ** 2) / sigma**2))
        out[i, x] = (w + alpha) * score[i, x]
  return out


def _problem(rng, p=30, g=50, n_qcam=3, n_gcam=4):
  score = rng.random((p, g)).astype(np.float32)
  qc, gc = rng.integers(0, n_qcam, p), rng.integers(0, n_gcam, g)
  qt, gt = rng.uniform(0, 600, p), rng.uniform(0, 600, g)
  return score, qc, qt, gc, gt


@pytest.mark.parametrize(
  "seed, tau, sigma, k, alpha",
  [
    (0, 100.0, 200.0, 10, 0.2),
    (1, 50.0, 100.0, 3, 0.0),
    (2, 1000.0, 50.0, 10, 0.2),
    (3, 1e-3, 200.0, 2, 0.5),
  ],
)
def test_matches_per_probe_reference(seed, tau, sigma, k, alpha):
  rng = np.random.default_rng(seed)
  score, qc, qt, gc, gt = _problem(rng)
  got = np.asarray(temporal_lift(score, qc, qt, gc, gt, tau, sigma, k, alpha, chunk=7))
  want = tlift_ref(score, qc, qt, gc, gt, tau, sigma, k, alpha)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# Outputs are at most 1 + alpha = 1.2, where float32 spacing is 1.2e-7; the exp, the mean over
# at most 2K pivots and (w + alpha) * s each round a little, and over 60 seeds the largest error
# was 1.7e-7 at every offset. 5e-7 (about 4 float32 spacings) leaves room for that and is still
# 20x below the old float32-absolute-time error at 1e5 s (1.2e-5; 1e-4 at 1e6 s, 0.2 at 1.7e9 s).
ATOL_F32 = 5e-7
EPOCH = 1.7e9  # a Unix time stamp in 2023: float32 spacing there is 128 s


@pytest.mark.parametrize("offset", [0.0, 1e5, 1e6, EPOCH])
def test_large_absolute_times_keep_float32_precision(offset):
  score, qc, qt, gc, gt = _problem(np.random.default_rng(11))
  got = np.asarray(temporal_lift(score, qc, qt + offset, gc, gt + offset, chunk=7))
  want = tlift_ref(score, qc, qt + offset, gc, gt + offset, 100.0, 200.0, 10, 0.2)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


def test_shifting_all_times_changes_nothing():
  score, qc, qt, gc, gt = _problem(np.random.default_rng(12))
  at_zero = np.asarray(temporal_lift(score, qc, qt, gc, gt))
  at_epoch = np.asarray(temporal_lift(score, qc, qt + EPOCH, gc, gt + EPOCH))
  np.testing.assert_allclose(at_epoch, at_zero, rtol=0, atol=ATOL_F32)


@pytest.mark.parametrize("levels, offset", [(4, 0.0), (1, 0.0), (4, EPOCH)])
def test_ties_count_every_entry_at_the_threshold(levels, offset):
  rng = np.random.default_rng(5)
  score, qc, qt, gc, gt = _problem(rng, p=12, g=20, n_qcam=1, n_gcam=2)
  score = (np.round(score * levels) / levels).astype(np.float32)  # heavy ties
  qt[:] = 0.0  # one block per camera holding every probe
  qt, gt = qt + offset, gt + offset  # every block here takes the float64 fallback: check it
  got = np.asarray(temporal_lift(score, qc, qt, gc, gt, k=3))
  np.testing.assert_allclose(
    got, tlift_ref(score, qc, qt, gc, gt, 100.0, 200.0, 3, 0.2), rtol=2e-5, atol=1e-6
  )


def test_empty_gallery_camera_is_skipped_and_small_blocks_use_all():
  rng = np.random.default_rng(7)
  score, qc, qt, gc, gt = _problem(rng, p=6, g=5, n_gcam=1)
  gc = np.where(np.arange(5) < 2, 0, 5)  # cameras 1-4 have no gallery images
  got = np.asarray(temporal_lift(score, qc, qt, gc, gt, tau=1.0, k=10))
  np.testing.assert_allclose(
    got, tlift_ref(score, qc, qt, gc, gt, 1.0, 200.0, 10, 0.2), rtol=2e-5, atol=1e-6
  )


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda a: a.update(qt=np.full(30, np.nan)), "finite time stamp"),
    (lambda a: a.update(gc=a["gc"][:-1]), "gallery_cams must have length 50"),
    (lambda a: a.update(score=a["score"][0]), r"score must be \[num_query"),
  ],
)
def test_bad_input(change, message):
  score, qc, qt, gc, gt = _problem(np.random.default_rng(0))
  a = dict(score=score, qc=qc, qt=qt, gc=gc, gt=gt)
  change(a)
  with pytest.raises(ValueError, match=message):
    temporal_lift(a["score"], a["qc"], a["qt"], a["gc"], a["gt"])
