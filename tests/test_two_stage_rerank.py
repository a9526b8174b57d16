"""Re-ranking from shortlists (docs/method.md §13) against dense re-ranking and a float64 loop
reference; the grouping of on-demand pairs."""

import numpy as np
import pytest

from qaconv_jax.evaluation.rerank import _Distances, column_maxima, k_reciprocal_rerank
from qaconv_jax.evaluation.rerank_lists import KnownDistances, neighbour_lists, shortlist_rerank
from qaconv_jax.evaluation.testset import _group_pairs
from tests.reference import reciprocal_v_ref
from tests.test_rerank import _clustered


def _lists_from_dense(d, index, neighbours, far):
  """The list distances shortlist_rerank takes, read from dense blocks ``d``."""
  n = len(neighbours)
  rows = np.arange(n)[:, None]
  return dict(
    index=index,
    dist_qg=np.take_along_axis(d.qg, index, axis=1),
    neighbours=neighbours,
    dist_neighbours=d.raw(np.broadcast_to(rows, neighbours.shape), neighbours),
    far=far,
    dist_far=d.raw(np.broadcast_to(rows, far.shape), far),
  )


@pytest.mark.parametrize("seed, k1, k2, lam", [(0, 20, 6, 0.3), (1, 6, 3, 0.3), (2, 5, 1, 0.0)])
def test_lists_covering_everything_give_dense_reranking(seed, k1, k2, lam):
  rng = np.random.default_rng(seed)
  p, g = 10, 24
  n = p + g
  qg, qq, gg = _clustered(rng, p, g)
  d = _Distances(qg, qq, gg)
  index = np.argsort(rng.random((p, g)), axis=1)  # every gallery item, in any order
  neighbours = np.argsort(rng.random((n, n)), axis=1)
  far = rng.integers(0, n, (n, 3))
  lists = _lists_from_dense(d, index, neighbours, far)
  calls = []
  got, info = shortlist_rerank(
    lambda i, j: calls.append(i) or d.raw(i, j), **lists, k1=k1, k2=k2, lambda_value=lam
  )
  want = k_reciprocal_rerank(qg, qq, gg, k1, k2, lam)
  assert got.dtype == np.float32 and got.shape == (p, g)
  np.testing.assert_array_equal(got, np.take_along_axis(want, index, axis=1))
  assert calls == [] and info["scored_on_demand"] == 0 and info["known_pairs"] == n * n
  np.testing.assert_array_equal(info["column_maxima"], column_maxima(qg, qq, gg))


def shortlist_rerank_ref(full, p, known, pairs, k1, k2, lam):
  """float64 loops: ``full [N, N]`` the distance over probe + gallery (``full[j, i]``: column
  i, row j), ``known`` the set of (i, j) whose ``full[j, i]`` the lists hold. Column maxima
  over the known entries; each row's k1 + 1 nearest among its known entries; the dense D'
  (over those maxima) everywhere else."""
  n = len(full)
  colmax = np.array([max(full[j, i] for j in range(n) if (i, j) in known) for i in range(n)])
  dp = full.T / colmax[:, None]  # dp[i, j] = D'[i, j] = full[j, i] / colmax[i]
  fwd = []
  for i in range(n):
    mine = [j for j in range(n) if (i, j) in known]
    fwd.append(sorted(mine, key=lambda j, i=i: (dp[i, j], j))[: k1 + 1])

  v = reciprocal_v_ref(dp, fwd, k1, k2)
  out = np.zeros(pairs.shape)
  for q in range(p):
    for s, x in enumerate(pairs[q]):
      m = np.minimum(v[q], v[p + x]).sum()
      out[q, s] = (1 - lam) * (1 - m / (2 - m)) + lam * dp[q, p + x]
  return out, colmax


@pytest.mark.parametrize("seed, k1, k2, lam", [(3, 7, 3, 0.3), (4, 8, 1, 0.5), (5, 6, 7, 0.3)])
def test_partial_lists_match_a_float64_reference(seed, k1, k2, lam):
  rng = np.random.default_rng(seed)
  p, g, k, num_near, num_far = 8, 30, 10, 10, 2
  n = p + g
  qg, qq, gg = _clustered(rng, p, g)
  d = _Distances(qg, qq, gg)
  full = np.block([[qq, qg], [qg.T, gg]]).astype(np.float64)
  index = np.stack([rng.permutation(g)[:k] for _ in range(p)])
  # Each row's nearest by a noisy copy of its column (as a global descriptor would find
  # them), itself first: reciprocal enough for expansions to reach beyond the lists.
  noisy = full.T + 0.3 * rng.random((n, n))
  np.fill_diagonal(noisy, -1.0)
  neighbours = np.argsort(noisy, axis=1)[:, :num_near]
  far = rng.integers(0, n, (n, num_far))
  known = {(i, int(j)) for i in range(n) for j in np.r_[neighbours[i], far[i]]}
  known |= {(q, p + int(x)) for q in range(p) for x in index[q]}
  known |= {(p + int(x), q) for q in range(p) for x in index[q]}
  asked = []

  def score_pairs(i, j):
    asked.extend(zip(i.tolist(), j.tolist()))
    return d.raw(i, j)

  lists = _lists_from_dense(d, index, neighbours, far)
  got, info = shortlist_rerank(score_pairs, **lists, k1=k1, k2=k2, lambda_value=lam)
  want, colmax = shortlist_rerank_ref(full, p, known, index, k1, k2, lam)
  assert got.dtype == np.float32 and got.shape == (p, k)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(info["column_maxima"], colmax, rtol=1e-7)
  assert info["known_pairs"] == len(known)
  assert asked and not set(asked) & known  # on demand: only pairs no list holds
  assert info["scored_on_demand"] == len(asked)
  # The partial column maxima differ from the dense ones: the reference's choice matters.
  assert (colmax < column_maxima(qg, qq, gg)).any()


def test_too_few_known_neighbours_are_refused():
  rng = np.random.default_rng(6)
  p, g = 4, 12
  qg, qq, gg = _clustered(rng, p, g)
  d = _Distances(qg, qq, gg)
  n = p + g
  neighbours = np.stack([np.r_[i, (i + 1) % n] for i in range(n)])
  lists = _lists_from_dense(d, np.zeros((p, 1), np.int64), neighbours, neighbours[:, :0])
  with pytest.raises(ValueError, match=r"of 2 images; re-ranking needs each image's k1 \+ 1 = 4"):
    shortlist_rerank(d.raw, **lists, k1=3, k2=2)
  # A row that knows fewer entries than its list is long (duplicates) is refused too.
  known = KnownDistances(3, [0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 2, 1], np.ones(6))
  with pytest.raises(ValueError, match=r"image 0 has 1 scored neighbours; re-ranking needs"):
    neighbour_lists(known, np.ones(3, np.float32), 2)


@pytest.mark.parametrize("group", [1, 3, 4, 16])
def test_group_pairs_puts_every_pair_at_its_slot(group):
  rng = np.random.default_rng(group)
  i = np.r_[np.full(11, 5), rng.integers(0, 9, 30)]  # anchor 5 needs several groups
  j = rng.integers(0, 40, len(i))
  perm = rng.permutation(len(i))
  i, j = i[perm], j[perm]
  anchors, cands, row, slot = _group_pairs(i, j, group)
  assert cands.shape == (len(anchors), group)
  np.testing.assert_array_equal(cands[row, slot], j)
  np.testing.assert_array_equal(anchors[row], i)
  assert len(set(zip(row.tolist(), slot.tolist()))) == len(i)  # one slot per pair
  per_anchor = np.bincount(i)
  assert len(anchors) == sum(-(-c // group) for c in per_anchor)  # the fewest rows
  for r in range(len(anchors)):  # a padding slot repeats one of its row's own candidates
    assert set(cands[r]) <= set(j[row == r]) and (row == r).any()
  a, c, r, s = _group_pairs(np.array([7]), np.array([3]), group)
  np.testing.assert_array_equal(a, [7])
  assert (c == 3).all() and r.tolist() == [0] and s.tolist() == [0]
