"""Re-ranking against a dense float64 implementation written from docs/method.md §6."""

import numpy as np
import pytest

from qaconv_jax.evaluation.rerank import k_reciprocal_rerank
from tests.reference import reciprocal_v_ref


def rerank_ref(qg, qq, gg, k1, k2, lam):
  p = len(qq)
  d = np.block([[qq, qg], [qg.T, gg]]).astype(np.float64)
  d = (d / d.max(axis=0)).T
  n = len(d)
  rank = np.argsort(d, axis=1, kind="stable")

  v = reciprocal_v_ref(d, rank, k1, k2)
  jd = np.zeros((p, n - p))
  for q in range(p):
    for x in range(n - p):
      m = np.minimum(v[q], v[p + x]).sum()
      jd[q, x] = 1 - m / (2 - m)
  return (1 - lam) * jd + lam * d[:p, p:]


def _clustered(rng, p, g, ids=6):
  """Distances with structure (people cluster), asymmetric like QAConv v1's."""
  pid = rng.integers(0, ids, p + g)
  centre = rng.normal(size=(ids, 8))
  x = centre[pid] + 0.6 * rng.normal(size=(p + g, 8))
  d = np.linalg.norm(x[:, None] - x[None], axis=-1) + 0.05 * rng.random((p + g, p + g))
  d = d.astype(np.float32)
  return d[:p, p:], d[:p, :p], d[p:, p:]


@pytest.mark.parametrize(
  "seed, k1, k2, lam", [(0, 20, 6, 0.3), (1, 6, 3, 0.3), (2, 8, 1, 0.5), (3, 4, 2, 0.0)]
)
def test_matches_dense_reference(seed, k1, k2, lam):
  rng = np.random.default_rng(seed)
  qg, qq, gg = _clustered(rng, 14, 40)
  got = k_reciprocal_rerank(qg, qq, gg, k1, k2, lam, block=7)
  assert got.shape == (14, 40) and got.dtype == np.float32
  np.testing.assert_allclose(got, rerank_ref(qg, qq, gg, k1, k2, lam), rtol=2e-5, atol=2e-6)


def test_reranking_helps_on_clustered_data():
  rng = np.random.default_rng(4)
  p, g = 30, 90
  pid = rng.integers(0, 10, p + g)
  centre = rng.normal(size=(10, 16))
  x = centre[pid] + 1.2 * rng.normal(size=(p + g, 16))
  d = np.linalg.norm(x[:, None] - x[None], axis=-1).astype(np.float32)
  qg, qq, gg = d[:p, p:], d[:p, :p], d[p:, p:]
  same = pid[:p, None] == pid[None, p:]

  def mean_ap(dist):
    aps = []
    for q in range(p):
      hits = same[q][np.argsort(dist[q], kind="stable")]
      ranks = np.flatnonzero(hits)
      aps.append(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1)))
    return np.mean(aps)

  assert mean_ap(k_reciprocal_rerank(qg, qq, gg, k1=8, k2=3)) > mean_ap(qg) + 0.02


def test_bad_input():
  with pytest.raises(ValueError, match=r"dist_qq \[P, P\]"):
    k_reciprocal_rerank(np.zeros((3, 4)), np.zeros((4, 4)), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="dist_gg holds NaN"):
    k_reciprocal_rerank(np.ones((3, 4)), np.ones((3, 3)), np.full((4, 4), np.nan))
  with pytest.raises(ValueError, match="k1=20 needs more than 20 images"):
    k_reciprocal_rerank(np.ones((3, 4)), np.ones((3, 3)), np.ones((4, 4)))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(k1=5, k2=7), r"k2=7: expected an integer in \[1, k1 \+ 1\] = \[1, 6\]"),
    (dict(k1=0, k2=1), r"k1=0: expected an integer >= 1"),
    (dict(k1=-3, k2=1), r"k1=-3: expected an integer >= 1"),
    (dict(k1=5, k2=0), r"k2=0: expected an integer in \[1, k1 \+ 1\]"),
    (dict(k1=5, k2=3, lambda_value=1.5), r"lambda_value=1.5: expected a weight in \[0, 1\]"),
    (dict(k1=5, k2=3, lambda_value=-0.1), r"lambda_value=-0.1: expected a weight in \[0, 1\]"),
  ],
)
def test_parameters_outside_their_ranges_are_refused(kwargs, message):
  # k2 > k1 + 1 used to read past each row's neighbour list and return wrong rows silently.
  qg, qq, gg = _clustered(np.random.default_rng(0), 10, 30)
  with pytest.raises(ValueError, match=message):
    k_reciprocal_rerank(qg, qq, gg, **kwargs)


def test_k2_at_its_limit_still_matches_the_reference():
  qg, qq, gg = _clustered(np.random.default_rng(2), 10, 30)
  np.testing.assert_allclose(
    k_reciprocal_rerank(qg, qq, gg, k1=5, k2=6),
    rerank_ref(qg, qq, gg, 5, 6, 0.3),
    rtol=2e-5,
    atol=2e-6,
  )


def test_ties_break_by_index_like_a_stable_sort():
  rng = np.random.default_rng(9)
  qg, qq, gg = _clustered(rng, 10, 30)
  qg, qq, gg = (np.round(a * 2) / 2 for a in (qg, qq, gg))  # few distinct values
  qg, qq, gg = (a.astype(np.float32) + 0.5 for a in (qg, qq, gg))
  got = k_reciprocal_rerank(qg, qq, gg, k1=6, k2=3, block=4)
  np.testing.assert_allclose(got, rerank_ref(qg, qq, gg, 6, 3, 0.3), rtol=2e-5, atol=2e-6)
