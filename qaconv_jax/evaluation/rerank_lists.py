"""k-reciprocal re-ranking of two-stage retrieval (docs/method.md §6, §13): the distances
re-ranking reads come from shortlists re-scored by QAConv, never from dense q-q or g-g.

The full distance ``D`` over probe + gallery (N = P + G, queries first) is known at:
each image's neighbour shortlist (its L nearest by the global descriptor, itself included),
its ``far`` farthest by the global descriptor, and the query shortlists in both directions.
Column maxima are taken over those entries (the farthest images stand in for the unscored
rest: with every pair known they are exact), each row's k1 + 1 nearest of its known entries
form its neighbour list, and any other ``D'`` entry re-ranking asks for (an expansion
candidate outside a row's own shortlist) is scored on demand. With shortlists as long as
the gallery and N, every entry is known and the result is `k_reciprocal_rerank`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qaconv_jax.evaluation.rerank import check_rerank_params, rerank_from_lists


class KnownDistances:
  """Entries ``D[j, i]`` known for pairs (row i, column j), as sorted keys ``i * N + j``."""

  def __init__(self, n: int, rows, cols, values):
    keys = np.asarray(rows, np.int64) * n + np.asarray(cols, np.int64)
    keys, first = np.unique(keys, return_index=True)  # a pair scored twice keeps one value
    self.n, self.keys = n, keys
    self.values = np.asarray(values, np.float32)[first]

  @property
  def rows(self) -> np.ndarray:
    return self.keys // self.n

  @property
  def cols(self) -> np.ndarray:
    return self.keys % self.n

  def find(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(found [M] bool, position [M])`` of pairs (i, j) in the table."""
    key = np.asarray(i, np.int64) * self.n + np.asarray(j, np.int64)
    pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
    return self.keys[pos] == key, pos


def column_maxima_known(known: KnownDistances) -> np.ndarray:
  """``[N]`` maxima of each row's known entries (re-ranking's column maxima)."""
  rows = known.rows
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
  out = np.full(known.n, -np.inf, np.float32)
  out[rows[starts]] = np.maximum.reduceat(known.values, starts)
  return out


def neighbour_lists(known: KnownDistances, colmax: np.ndarray, k: int) -> np.ndarray:
  """``[N, k]`` the k smallest known ``D'`` entries of every row, ascending, ties by
  column; raises if a row knows fewer than k entries."""
  rows, cols = known.rows, known.cols
  dprime = known.values / colmax[rows]
  order = np.lexsort((cols, dprime, rows))  # by row, then D', then column
  rows, cols = rows[order], cols[order]
  starts = np.searchsorted(rows, np.arange(known.n))
  counts = np.diff(np.r_[starts, len(rows)])
  if counts.min() < k:
    raise ValueError(
      f"image {int(counts.argmin())} has {int(counts.min())} scored neighbours; re-ranking "
      f"needs k1 + 1 = {k} (a longer shortlist)."
    )
  return cols[starts[:, None] + np.arange(k)[None, :]]


def shortlist_rerank(
  score_pairs: Callable,
  index: np.ndarray,
  dist_qg: np.ndarray,
  neighbours: np.ndarray,
  dist_neighbours: np.ndarray,
  far: np.ndarray,
  dist_far: np.ndarray,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
) -> tuple[np.ndarray, dict]:
  """Re-ranked ``[P, K]`` distances of the query shortlists, and counts.

  Args:
    score_pairs: ``(i [M], j [M]) -> D[j, i] [M]`` float32 for pairs no list holds.
    index: ``[P, K]`` gallery columns of the query shortlists; ``dist_qg [P, K]`` their
      distances ``D[q, P + index]``.
    neighbours, far: ``[N, L]``, ``[N, m]`` indices over probe + gallery of each image's
      nearest (itself included) and farthest by the global descriptor; ``dist_neighbours``,
      ``dist_far``: their distances ``D[j, i]`` (j the listed image, i the row).
    k1, k2, lambda_value: as `k_reciprocal_rerank`.

  Returns:
    ``(reranked [P, K] float32, {"known_pairs", "scored_on_demand", "column_maxima" [N]})``.
  """
  check_rerank_params(k1, k2, lambda_value)
  p, n = len(index), len(neighbours)
  g = n - p
  if k1 + 1 > n:
    raise ValueError(f"k1={k1} needs more than {k1} images; got {n}.")
  if neighbours.shape[1] < k1 + 1:  # else far or shortlist entries would pass for neighbours
    raise ValueError(
      f"neighbour shortlists of {neighbours.shape[1]} images; re-ranking needs each image's "
      f"k1 + 1 = {k1 + 1} nearest (a longer eval.neighbour_shortlist / eval.shortlist)."
    )
  rows = [
    np.repeat(np.arange(n), neighbours.shape[1]),
    np.repeat(np.arange(n), far.shape[1]),
    np.repeat(np.arange(p), index.shape[1]),
    p + index.reshape(-1),
  ]
  cols = [neighbours.reshape(-1), far.reshape(-1), p + index.reshape(-1), rows[2]]
  vals = [dist_neighbours, dist_far, dist_qg, dist_qg]
  known = KnownDistances(
    n, np.concatenate(rows), np.concatenate(cols), np.concatenate([v.reshape(-1) for v in vals])
  )
  colmax = column_maxima_known(known)
  fwd = neighbour_lists(known, colmax, k1 + 1)
  on_demand = [0]

  def dprime(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    found, pos = known.find(i, j)
    out = np.where(found, known.values[pos], np.float32(0.0))
    if not found.all():
      out[~found] = score_pairs(i[~found], j[~found])
      on_demand[0] += int((~found).sum())
    return out / colmax[i]

  reranked = rerank_from_lists(fwd, dprime, p, g, k2, lambda_value, pairs=index)
  info = {"known_pairs": len(known.keys), "scored_on_demand": on_demand[0], "column_maxima": colmax}
  return reranked, info
