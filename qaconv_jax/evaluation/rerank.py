"""k-reciprocal re-ranking (Zhong et al. 2017) as QAConv applies it (docs/method.md §6).

Built on neighbour lists: the ``(P+G)^2`` matrix is never materialised. Row i of the
normalised distance ``D'`` (column i of the full distance over that column's maximum) is
read from the three input blocks when needed; only ``[N, k1+1]`` neighbour lists and the
sparse rows of V (a few tens of entries each) are kept, so memory beyond the inputs grows
with ``N * k``. Everything is float32, as the inputs.
"""

from __future__ import annotations

import numpy as np


def check_rerank_params(k1: int, k2: int, lambda_value: float) -> None:
  """Raises ``ValueError`` naming a parameter outside the range the method is defined on."""
  if int(k1) != k1 or k1 < 1:
    raise ValueError(f"k1={k1!r}: expected an integer >= 1 (the neighbours of each image).")
  if int(k2) != k2 or not 1 <= k2 <= k1 + 1:
    raise ValueError(
      f"k2={k2!r}: expected an integer in [1, k1 + 1] = [1, {int(k1) + 1}] (query "
      "expansion averages each image's k2 nearest of its k1 + 1 neighbours)."
    )
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(
      f"lambda_value={lambda_value!r}: expected a weight in [0, 1] (the share of "
      "the original distance in the result)."
    )


def column_maxima(dist_qg, dist_qq, dist_gg) -> np.ndarray:
  """``[P + G]`` float32 column maxima of the full distance ``[[qq, qg], [qg^T, gg]]``, by
  which re-ranking divides each column (docs/method.md §6)."""
  return np.concatenate(
    [
      np.maximum(dist_qq.max(axis=0), dist_qg.max(axis=1)),
      np.maximum(dist_qg.max(axis=0), dist_gg.max(axis=0)),
    ]
  ).astype(np.float32)


class _Distances:
  """Random access to the normalised, transposed full distance ``D'`` ``[N, N]``."""

  def __init__(self, qg, qq, gg):
    self.qg, self.qq, self.gg = qg, qq, gg
    self.p, self.g = qg.shape
    self.colmax = column_maxima(qg, qq, gg)

  def rows(self, lo: int, hi: int) -> np.ndarray:
    """``D'[lo:hi, :]`` as ``[hi-lo, N]`` float32."""
    p = self.p
    parts = []
    if lo < p:
      a, b = lo, min(hi, p)
      parts.append(np.concatenate([self.qq[:, a:b].T, self.qg[a:b]], axis=1))
    if hi > p:
      a, b = max(lo, p) - p, hi - p
      parts.append(np.concatenate([self.qg[:, a:b].T, self.gg[:, a:b].T], axis=1))
    return np.concatenate(parts, axis=0) / self.colmax[lo:hi, None]

  def at(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``D'[i, j]`` for index arrays of one shape: ``D[j, i] / colmax[i]``."""
    return self.raw(i, j) / self.colmax[i]

  def raw(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``D[j, i]`` (the full distance, before the column maxima) for index arrays."""
    p = self.p
    out = np.empty(i.shape, np.float32)
    for iq in (True, False):
      for jq in (True, False):
        m = ((i < p) == iq) & ((j < p) == jq)
        ii, jj = i[m], j[m]
        if iq and jq:
          out[m] = self.qq[jj, ii]
        elif iq:
          out[m] = self.qg[ii, jj - p]
        elif jq:
          out[m] = self.qg[jj, ii - p]
        else:
          out[m] = self.gg[jj - p, ii - p]
    return out


def _neighbours(d: _Distances, k: int, block: int) -> np.ndarray:
  """``[N, k]`` nearest columns of every row of ``D'``, ascending, ties by column index."""
  n = d.p + d.g
  out = np.empty((n, k), np.int64)
  for lo in range(0, n, block):
    rows = d.rows(lo, min(n, lo + block))  # [b, N]
    part = np.argpartition(rows, k - 1, axis=1)[:, :k]  # the k smallest, unordered
    kth = np.take_along_axis(rows, part, axis=1).max(axis=1)
    # Ties at the cut-off value: argpartition may pick any of them; re-select such rows
    # (rare) with a stable sort so the lowest column indices win, as a stable argsort does.
    tied = np.flatnonzero((rows <= kth[:, None]).sum(axis=1) > k)
    if len(tied):
      part[tied] = np.argsort(rows[tied], axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(rows, part, axis=1)
    out[lo : lo + len(rows)] = order_by_value_then_index(vals, part)
  return out


def order_by_value_then_index(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Rows of ``idx`` sorted by (``vals``, ``idx``); both ``[b, k]``."""
  o = np.argsort(idx, axis=1, kind="stable")
  vals, idx = np.take_along_axis(vals, o, axis=1), np.take_along_axis(idx, o, axis=1)
  o = np.argsort(vals, axis=1, kind="stable")
  return np.take_along_axis(idx, o, axis=1)


def _reciprocal(fwd: np.ndarray) -> np.ndarray:
  """``fwd [N, m]`` lists -> mask ``[N, m]``: j = fwd[i, s] also has i in fwd[j]."""
  n = len(fwd)
  out = np.empty(fwd.shape, bool)
  for lo in range(0, n, 4096):
    f = fwd[lo : lo + 4096]
    out[lo : lo + 4096] = (fwd[f] == np.arange(lo, lo + len(f))[:, None, None]).any(axis=2)
  return out


def _unique_rows(cols: np.ndarray, vals: np.ndarray):
  """Padded sparse rows (``cols < 0`` = empty) -> the same rows with duplicate columns
  merged (values summed), columns ascending, narrowest padding."""
  n = len(cols)
  order = np.argsort(np.where(cols < 0, np.iinfo(cols.dtype).max, cols), axis=1, kind="stable")
  c = np.take_along_axis(cols, order, axis=1)
  v = np.take_along_axis(vals, order, axis=1)
  first = c >= 0
  first[:, 1:] &= c[:, 1:] != c[:, :-1]
  seg = np.cumsum(first.ravel()) - 1  # run id of every entry (padding adds 0.0 below)
  sums = np.bincount(
    seg[c.ravel() >= 0], weights=v.ravel()[c.ravel() >= 0], minlength=int(first.sum())
  )
  counts = first.sum(axis=1)
  row = np.repeat(np.arange(n), counts)
  pos = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
  out_cols = np.full((n, max(1, int(counts.max()))), -1, cols.dtype)
  out_vals = np.zeros(out_cols.shape, np.float32)
  out_cols[row, pos] = c[first]
  out_vals[row, pos] = sums
  return out_cols, out_vals


def k_reciprocal_rerank(
  dist_qg, dist_qq, dist_gg, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, block: int = 1024
) -> np.ndarray:
  """Re-ranked ``[P, G]`` float32 distance (docs/method.md §6).

  Args:
    dist_qg: ``[P, G]``; dist_qq: ``[P, P]``; dist_gg: ``[G, G]`` (QAConv distances;
      need not be symmetric).
    k1, k2, lambda_value: the usual parameters (defaults as QAConv uses them); ``k1 >= 1``,
      ``1 <= k2 <= k1 + 1``, ``0 <= lambda_value <= 1`` (`check_rerank_params`).
    block: rows of ``D'`` materialised at a time while finding neighbours.
  """
  check_rerank_params(k1, k2, lambda_value)
  qg = np.asarray(dist_qg, np.float32)
  qq = np.asarray(dist_qq, np.float32)
  gg = np.asarray(dist_gg, np.float32)
  p, g = qg.shape if qg.ndim == 2 else (-1, -1)
  if qg.ndim != 2 or qq.shape != (p, p) or gg.shape != (g, g):
    raise ValueError(
      f"expected dist_qg [P, G], dist_qq [P, P], dist_gg [G, G]; got "
      f"{qg.shape}, {qq.shape}, {gg.shape}."
    )
  if p == 0 or g == 0:
    raise ValueError(f"empty query or gallery: dist_qg has shape {qg.shape}.")
  for name, a in (("dist_qg", qg), ("dist_qq", qq), ("dist_gg", gg)):
    if not np.isfinite(a).all():
      raise ValueError(f"{name} holds NaN/Inf.")
  n = p + g
  if k1 + 1 > n:
    raise ValueError(f"k1={k1} needs more than {k1} images; got {n}.")
  d = _Distances(qg, qq, gg)
  fwd = _neighbours(d, k1 + 1, block)  # [N, k1+1] (includes i itself, first)
  original = qg / d.colmax[:p, None]  # D'[q, P + x], read straight from the q-g block
  return rerank_from_lists(fwd, d.at, p, g, k2, lambda_value, original=original)


def rerank_from_lists(
  fwd: np.ndarray,
  dprime,
  p: int,
  g: int,
  k2: int,
  lambda_value: float,
  pairs=None,
  original: np.ndarray | None = None,
) -> np.ndarray:
  """k-reciprocal re-ranking from neighbour lists (docs/method.md §6, §13).

  Args:
    fwd: ``[N, k1 + 1]`` the nearest columns of every row of ``D'`` (N = P + G, queries
      first), ascending, ties by column index.
    dprime: ``dprime(i, j) -> D'[i, j]`` float32 for index arrays of one shape (``D'``: the
      full distance transposed, each row over its column maximum). Called for the entries
      of each row's expanded k-reciprocal set and for the output pairs only.
    p, g: query and gallery counts.
    k2, lambda_value: as `k_reciprocal_rerank` (k1 is ``fwd.shape[1] - 1``).
    pairs: None for the dense ``[P, G]`` result, or ``[P, K]`` gallery columns: the result
      is then ``[P, K]`` at ``(q, pairs[q, s])`` (two-stage retrieval's shortlists).
    original: ``D'`` at the result's pairs when the caller has it at hand (else read
      through ``dprime``).
  """
  n, k = fwd.shape
  k1 = k - 1
  recip = _reciprocal(fwd)
  half = int(np.around(k1 / 2))
  fwd_h = fwd[:, : half + 1]
  recip_h = _reciprocal(fwd_h)
  r_cols = np.where(recip, fwd, -1)  # R(i), padded  [N, k1+1]

  # Expansion: add R_half(j) for j in R(i) when > 2/3 of it is already in R(i).
  cand = np.where(recip_h[fwd], fwd_h[fwd], -1)  # R_half(fwd[i, s]) [N, k1+1, half+1]
  cand = np.where(recip[..., None], cand, -1)
  size = (cand >= 0).sum(axis=2)
  inside = ((cand[..., None] == r_cols[:, None, None, :]) & (cand[..., None] >= 0)).any(axis=3)
  accept = inside.sum(axis=2) > (2.0 / 3.0) * size  # [N, k1+1]
  expanded = np.concatenate([r_cols, np.where(accept[..., None], cand, -1).reshape(n, -1)], axis=1)
  cols, _ = _unique_rows(expanded, np.zeros(expanded.shape, np.float32))  # the union
  rows = np.arange(n)[:, None].repeat(cols.shape[1], 1)
  filled = cols >= 0
  vals = np.zeros(cols.shape, np.float32)
  vals[filled] = np.exp(-dprime(rows[filled], cols[filled]))
  total = vals.sum(axis=1, keepdims=True)  # softmax(-D'[i, R]); an empty R(i) stays all zero
  vals = (vals / np.where(total > 0, total, 1.0)).astype(np.float32)

  if k2 > 1:  # query expansion: V[i] = mean of V over i's k2 nearest neighbours
    nb = fwd[:, :k2]
    cols, vals = _unique_rows(cols[nb].reshape(n, -1), (vals[nb] / k2).reshape(n, -1))

  jaccard = _jaccard_distance(cols, vals, p, g, pairs)
  if original is None:
    if pairs is None:
      pairs = np.broadcast_to(np.arange(g), (p, g))
    original = dprime(np.broadcast_to(np.arange(p)[:, None], pairs.shape), p + pairs)
  return ((1.0 - lambda_value) * jaccard + lambda_value * original).astype(np.float32)


def _jaccard_distance(cols, vals, p, g, pairs=None, chunk: int = 512) -> np.ndarray:
  """``1 - m / (2 - m)`` with ``m[q, x] = sum_c min(V[q, c], V[P + x, c])``, via an
  inverted index of the gallery rows' entries: ``[P, G]``, or ``[P, K]`` at ``pairs``
  (each chunk of queries is still computed against the whole gallery, ``[chunk, G]``)."""
  gal_cols, gal_vals = cols[p:], vals[p:]
  rows, slots = np.nonzero(gal_cols >= 0)
  ent_col, ent_row, ent_val = gal_cols[rows, slots], rows, gal_vals[rows, slots]
  order = np.argsort(ent_col, kind="stable")
  ent_col, ent_row, ent_val = ent_col[order], ent_row[order], ent_val[order]
  n = cols.shape[0] if cols.size else 0
  start = np.searchsorted(ent_col, np.arange(n + 1))
  out = np.empty((p, g) if pairs is None else pairs.shape, np.float32)
  for lo in range(0, p, chunk):
    hi = min(p, lo + chunk)
    q_rows, q_slots = np.nonzero(cols[lo:hi] >= 0)
    q_col = cols[lo:hi][q_rows, q_slots]
    q_val = vals[lo:hi][q_rows, q_slots]
    count = start[q_col + 1] - start[q_col]  # gallery entries sharing each column
    rep = np.repeat(np.arange(len(q_col)), count)
    offset = np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count)
    ent = start[q_col][rep] + offset
    contrib = np.minimum(q_val[rep], ent_val[ent])
    m = np.bincount(
      q_rows[rep] * g + ent_row[ent], weights=contrib, minlength=(hi - lo) * g
    ).reshape(hi - lo, g)
    if pairs is not None:
      m = np.take_along_axis(m, pairs[lo:hi], axis=1)
    out[lo:hi] = 1.0 - m / (2.0 - m)
  return out
