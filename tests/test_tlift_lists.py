"""TLift on per-probe lists against the dense TLift and a per-entry loop from docs/method.md §7."""

import math

import numpy as np
import pytest

from qaconv_jax.evaluation import tlift_lists
from qaconv_jax.evaluation.tlift import temporal_lift
from qaconv_jax.evaluation.tlift_lists import temporal_lift_lists

ATOL_F32 = 5e-7  # as tests/test_tlift.py: a few float32 spacings at outputs up to 1 + alpha
EPOCH = 1.7e9  # a Unix time stamp in 2023


def lists_ref(score, index, qc, qt, gc, gt, tau, sigma, k, alpha):
  """Plain loops over (probe, listed entry), float64, straight from the semantics."""
  p, n = index.shape
  out = np.full((p, n), np.nan)
  for i in range(p):
    rows = [b for b in range(p) if qc[b] == qc[i] and abs(qt[b] - qt[i]) < tau]
    for x in range(n):
      cam, t_x = gc[index[i, x]], gt[index[i, x]]
      block = [
        (float(score[b, y]), float(gt[index[b, y]]))
        for b in rows
        for y in range(n)
        if gc[index[b, y]] == cam
      ]
      values = sorted((v for v, _ in block), reverse=True)
      thr = values[k - 1] if len(values) > k else -math.inf
      pivots = [t_j for v, t_j in block if v >= thr]  # every tie, every duplicate column
      w = sum(math.exp(-((t_j - t_x) ** 2) / sigma**2) for t_j in pivots) / len(pivots)
      out[i, x] = (w + alpha) * float(score[i, x])
  return out


def _cameras_and_times(rng, p, g, n_qcam, n_gcam, span):
  qc = rng.integers(0, n_qcam, p)
  gc = 3 * rng.integers(0, n_gcam, g) + 5  # camera ids need not be 0..C-1
  return qc, rng.uniform(0, span, p), gc, rng.uniform(0, span, g)


@pytest.mark.parametrize(
  "seed, tau, sigma, k, alpha, offset, levels",
  [
    (0, 100.0, 200.0, 10, 0.2, 0.0, 0),
    (1, 100.0, 200.0, 10, 0.2, EPOCH, 0),
    (2, 60.0, 50.0, 3, 0.0, 1e5, 0),
    (3, 1e4, 100.0, 4, 0.5, EPOCH, 0),  # one window per camera: several table pieces
    (4, 100.0, 200.0, 3, 0.2, 0.0, 3),  # heavy ties: the dense and list fallbacks
  ],
)
def test_full_lists_match_dense(seed, tau, sigma, k, alpha, offset, levels):
  rng = np.random.default_rng(seed)
  p, g = 30, 40
  dense = rng.uniform(0.01, 0.99, (p, g)).astype(np.float32)
  if levels:
    dense = (np.ceil(dense * levels) / levels).astype(np.float32)
  qc, qt, gc, gt = _cameras_and_times(rng, p, g, n_qcam=3, n_gcam=4, span=300.0)
  qt, gt = qt + offset, gt + offset
  index = np.argsort(rng.random((p, g)), axis=1)  # every column, a different order per row
  rows = np.arange(p)[:, None]
  got = temporal_lift_lists(dense[rows, index], index, qc, qt, gc, gt, tau, sigma, k, alpha)
  want = np.asarray(temporal_lift(dense, qc, qt, gc, gt, tau, sigma, k, alpha))[rows, index]
  assert got.dtype == np.float32 and got.shape == (p, g)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


def _partial_problem(rng, p, g, n, n_qcam, n_gcam, span, levels=0):
  index = np.stack([rng.permutation(g)[:n] for _ in range(p)])  # different columns per row
  score = rng.uniform(0.01, 0.99, (p, n))
  if levels:
    score = np.ceil(score * levels) / levels
  qc, qt, gc, gt = _cameras_and_times(rng, p, g, n_qcam, n_gcam, span)
  return score.astype(np.float32), index, qc, qt, gc, gt


@pytest.mark.parametrize(
  "seed, p, g, n, n_gcam, tau, k, levels, offset",
  [
    (0, 20, 30, 8, 3, 100.0, 3, 0, 0.0),
    (1, 20, 30, 8, 3, 100.0, 10, 0, EPOCH),  # many blocks with at most k entries
    (2, 16, 24, 20, 2, 100.0, 3, 3, 0.0),  # ties at the k-th value past the 2k lists
    (3, 16, 24, 20, 2, 1e4, 2, 2, 0.0),  # all ties, one window per query camera
    (4, 16, 24, 20, 2, 1e4, 1, 1, EPOCH),  # one score value everywhere
    (5, 24, 60, 5, 4, 150.0, 2, 4, 0.0),
  ],
)
def test_partial_lists_match_loop_reference(seed, p, g, n, n_gcam, tau, k, levels, offset):
  rng = np.random.default_rng(seed)
  score, index, qc, qt, gc, gt = _partial_problem(rng, p, g, n, 2, n_gcam, 300.0, levels)
  qt, gt = qt + offset, gt + offset
  got = temporal_lift_lists(score, index, qc, qt, gc, gt, tau, 200.0, k, 0.2)
  want = lists_ref(score, index, qc, qt, gc, gt, tau, 200.0, k, 0.2)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


@pytest.mark.parametrize("chunk", [3, 600])
def test_ties_in_small_chunks(monkeypatch, chunk):
  # The tied blocks here hold 9 to 95 entries and ~200 (pivot, entry) pairs: 600 splits the
  # exact pass into spans of a few rows; 3 takes each row alone, its pivots a few at a time.
  monkeypatch.setattr(tlift_lists, "_CHUNK", chunk)
  rng = np.random.default_rng(9)
  score, index, qc, qt, gc, gt = _partial_problem(rng, 16, 24, 20, 2, 2, 300.0, levels=3)
  got = temporal_lift_lists(score, index, qc, qt, gc, gt, k=3)
  want = lists_ref(score, index, qc, qt, gc, gt, 100.0, 200.0, 3, 0.2)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


def test_duplicate_pivot_columns_and_small_blocks():
  rng = np.random.default_rng(7)
  score, index, qc, qt, gc, gt = _partial_problem(rng, 12, 20, 6, 1, 2, 50.0)
  # Every probe lists column 0 at the top (and column 1 just below): one window's rows
  # all pick the same pivot columns, each counted once per row.
  index[:, :2] = [0, 1]
  index[:, 2:] = np.stack([rng.permutation(np.arange(2, 20))[:4] for _ in range(12)])
  score[:, 0], score[:, 1] = 0.99, 0.98
  gc[1] = gc[0]
  for k in (1, 2, 3, 30):  # 30: every block has fewer than k entries
    got = temporal_lift_lists(score, index, qc, qt, gc, gt, k=k)
    want = lists_ref(score, index, qc, qt, gc, gt, 100.0, 200.0, k, 0.2)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


def test_a_window_of_one_keeps_its_row_top_k():
  score = np.array([[0.9, 0.8, 0.7, 0.1]], np.float32)
  index = np.array([[3, 0, 2, 1]])
  gt = np.array([0.0, 1000.0, 50.0, 10.0])
  got = temporal_lift_lists(score, index, [0], [0.0], [0, 0, 0, 0], gt, sigma=100.0, k=2)
  w = (np.exp(-((10.0 - gt[index[0]]) ** 2) / 1e4) + np.exp(-(gt[index[0]] ** 2) / 1e4)) / 2
  np.testing.assert_allclose(got[0], (w + 0.2) * score[0], rtol=1e-6)


def _args():
  score, index, qc, qt, gc, gt = _partial_problem(np.random.default_rng(0), 6, 10, 4, 2, 2, 100)
  return dict(score=score, index=index, qc=qc, qt=qt, gc=gc, gt=gt)


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda a: a.update(score=a["score"][0]), r"score must be \[num_query"),
    (lambda a: a.update(index=a["index"][:, :3]), "index must have the shape"),
    (lambda a: a.update(index=a["index"] + 0.0), "integer gallery columns"),
    (lambda a: a["index"].__setitem__((2, 1), 10), r"index must lie in \[0, 10\)"),
    (lambda a: a["index"].__setitem__((0, 0), -1), r"index must lie in \[0, 10\)"),
    (lambda a: a["index"].__setitem__((3, 1), a["index"][3, 2]), "twice in row 3"),
    (lambda a: a["score"].__setitem__((1, 1), np.nan), "score must be finite"),
    (lambda a: a["score"].__setitem__((1, 1), np.inf), "score must be finite"),
    (lambda a: a.update(qc=a["qc"][:-1]), "query_cams must have length 6"),
    (lambda a: a.update(qt=a["qt"][:-1]), "query_times must have length 6"),
    (lambda a: a.update(gt=a["gt"][:-1]), "gallery_times must have length 10"),
    (lambda a: a["qt"].__setitem__(0, np.nan), "finite time stamp"),
    (lambda a: a["gt"].__setitem__(0, np.inf), "finite time stamp"),
    (lambda a: a.update(tau=0.0), "tau > 0"),
    (lambda a: a.update(sigma=0.0), "sigma > 0"),
    (lambda a: a.update(sigma=-5.0), "sigma > 0"),
    (lambda a: a.update(k=0), "k must be an integer >= 1"),
    (lambda a: a.update(k=2.5), "k must be an integer >= 1"),
    (lambda a: a.update({n: a[n][:0] for n in ("score", "index", "qc", "qt")}), "non-empty"),
  ],
)
def test_bad_input(change, message):
  a = _args()
  change(a)
  with pytest.raises(ValueError, match=message):
    temporal_lift_lists(
      a["score"],
      a["index"],
      a["qc"],
      a["qt"],
      a["gc"],
      a["gt"],
      tau=a.get("tau", 100.0),
      sigma=a.get("sigma", 200.0),
      k=a.get("k", 10),
    )
