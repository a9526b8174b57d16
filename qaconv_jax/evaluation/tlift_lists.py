"""Temporal Lifting on per-probe candidate lists (docs/method.md §7).

``tlift.temporal_lift`` lifts a dense ``[P, G]`` score. Here each probe has a list instead,
``score [P, K]`` at gallery columns ``index [P, K]``, read as that dense matrix with only the
listed entries present. For probe i in camera c and gallery camera g, the block B holds the
listed entries, in camera g, of the probes of camera c within ``tau`` seconds of i (i
included). The pivots are ALL entries of B at or above its k-th largest value (every entry
when B has at most k), with duplicate columns counted. Each listed entry x of row i in camera
g becomes ``(mean_j exp(-(t_j - t_x)^2 / sigma^2) + alpha) * score``. With every column
listed this is ``temporal_lift`` gathered at the listed entries.

Vectorised on the host, with times in float64 relative to the earliest one. Probes sorted by
(camera, time) make each window a contiguous range of rows (``tlift._windows``, so windows
are the dense version's exactly). Per gallery camera, a doubling table keeps the top ``2k``
entries (value and time) of every row range ``[r, r + 2^j)``. A window splits into at most
``log2(width) + 1`` disjoint such ranges, and the block's k-th largest value lies within
their lists: each list is the exact top ``2k`` of its range. A pivot can be missing from
those lists only when ties at the threshold reach a list's end (a truncated list whose last
value equals the threshold) or pass the ``2k`` pivot slots. Those (probe, camera) pairs
are recomputed exactly from the whole block, so ties always count.
"""

from __future__ import annotations

import numpy as np

from qaconv_jax.evaluation.tlift import _windows

_CHUNK = 1 << 18  # elements per kernel pass: float64 temporaries of 2 MiB each


def _check(score, index, query_cams, query_times, gallery_cams, gallery_times, tau, sigma, k):
  """Validated ``(score f32 [P, K], index int64 [P, K], qc, qt f64, gc, gt f64)``."""
  score = np.asarray(score)
  index = np.asarray(index)
  if score.ndim != 2:
    raise ValueError(f"score must be [num_query, list_length], got shape {score.shape}.")
  if index.shape != score.shape:
    raise ValueError(f"index must have the shape of score {score.shape}, got {index.shape}.")
  if not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f"index must hold integer gallery columns, got dtype {index.dtype}.")
  p, n = score.shape
  qc, qt = np.asarray(query_cams), np.asarray(query_times, np.float64)
  gc, gt = np.asarray(gallery_cams), np.asarray(gallery_times, np.float64)
  if gc.ndim != 1:
    raise ValueError(f"gallery_cams must be [num_gallery], got shape {gc.shape}.")
  g = len(gc)
  for name, arr, m in (
    ("query_cams", qc, p),
    ("query_times", qt, p),
    ("gallery_times", gt, g),
  ):
    if arr.shape != (m,):
      raise ValueError(f"{name} must have length {m}, got shape {arr.shape}.")
  if not (np.isfinite(qt).all() and np.isfinite(gt).all()):
    raise ValueError(
      "TLift needs a finite time stamp for every image; this set has none "
      "(or some are NaN): skip TLift for it."
    )
  if p == 0 or n == 0 or g == 0:
    raise ValueError(f"need non-empty lists (got {score.shape}) and gallery (got {g}).")
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}.")
  if not (tau > 0 and sigma > 0):  # `not >` also refuses NaN
    raise ValueError(f"need tau > 0 and sigma > 0, got tau={tau}, sigma={sigma}.")
  if index.min() < 0 or index.max() >= g:
    raise ValueError(f"index must lie in [0, {g}), got values in [{index.min()}, {index.max()}].")
  srt = np.sort(index, axis=1)
  dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
  if dup.size:
    raise ValueError(f"index lists a gallery column twice in row {dup[0]} ({dup.size} rows).")
  score = score.astype(np.float32)  # the dense version's ties are those of float32 values
  if not np.isfinite(score).all():
    raise ValueError("score must be finite (in float32); absent entries are left out of index.")
  return score, index.astype(np.int64), qc, qt, gc, gt


def _kernel_mean(pivot_t: np.ndarray, x_t: np.ndarray, neg_inv: float) -> np.ndarray:
  """``mean_j exp((t_j - t_x)^2 * neg_inv)`` ``[X]`` over pivots ``[J]``, in pivot chunks."""
  total = np.zeros(len(x_t))
  step = max(1, _CHUNK // max(1, len(x_t)))
  for a in range(0, len(pivot_t), step):
    d = pivot_t[a : a + step, None] - x_t[None, :]
    total += np.exp(d * d * neg_inv).sum(axis=0)
  return total / len(pivot_t)


def _top(v: np.ndarray, t: np.ndarray, cap: int):
  """Rows' ``cap`` largest values ``[R, cap]``, descending, with their times."""
  sel = np.argsort(-v, axis=1, kind="stable")[:, :cap]
  return np.take_along_axis(v, sel, axis=1), np.take_along_axis(t, sel, axis=1)


def _ragged(starts: np.ndarray, lengths: np.ndarray):
  """Positions ``starts[o] + [0, lengths[o])`` of every owner o in turn ``[N]``, and owners."""
  own = np.repeat(np.arange(len(starts)), lengths)
  first = np.cumsum(lengths) - lengths
  return starts[own] + np.arange(len(own)) - first[own], own


def _spans(cost: np.ndarray):
  """Consecutive ``[s, e)`` whose summed ``cost`` stays within _CHUNK (or a single item)."""
  ends = np.cumsum(cost)
  s = 0
  while s < len(cost):
    base = ends[s - 1] if s else 0
    e = max(s + 1, int(np.searchsorted(ends, base + _CHUNK, "right")))
    yield s, e
    s = e


def _exact_weights(rows, thr, cum, lo, hi, ev, et, neg_inv, w):
  """Overwrite ``w`` at the entries of ``rows [R]`` with the pivots of their whole blocks.

  ``thr [R]``: the blocks' k-th largest values (the lists always hold those exactly; only
  ties at them may be missing). Other arguments as in `_lift_camera`.
  """
  start, n_blk = cum[lo[rows]], cum[hi[rows]] - cum[lo[rows]]
  n_ent = cum[rows + 1] - cum[rows]
  n_piv = np.empty(len(rows), np.int64)
  for s, e in _spans(n_blk):
    pos, own = _ragged(start[s:e], n_blk[s:e])
    n_piv[s:e] = np.bincount(own[ev[pos] >= thr[s:e][own]], minlength=e - s)
  pairs = n_piv * n_ent
  for i in np.flatnonzero(pairs > _CHUNK):  # a huge tied block: its pairs in chunks
    blk, mine = slice(start[i], start[i] + n_blk[i]), slice(cum[rows[i]], cum[rows[i] + 1])
    w[mine] = _kernel_mean(et[blk][ev[blk] >= thr[i]], et[mine], neg_inv)
  small = np.flatnonzero(pairs <= _CHUNK)
  for s, e in _spans(n_blk[small] + pairs[small]):
    sel = small[s:e]
    pos, own = _ragged(start[sel], n_blk[sel])
    piv = ev[pos] >= thr[sel][own]
    pos, own = pos[piv], own[piv]  # pivots, grouped by row
    # Every pivot meets each entry of its row; the entries of `sel` numbered 0.. in turn.
    ent, pv = _ragged(cum[rows[sel]][own], n_ent[sel][own])
    first = np.cumsum(n_ent[sel]) - n_ent[sel]
    local = first[own[pv]] + ent - cum[rows[sel]][own[pv]]
    d = et[pos[pv]] - et[ent]
    total = np.bincount(local, weights=np.exp(d * d * neg_inv), minlength=n_ent[sel].sum())
    ent, own = _ragged(cum[rows[sel]], n_ent[sel])
    w[ent] = total / n_piv[sel][own]


def _lift_camera(er, ev, et, lo, hi, k, neg_inv):
  """Weights ``w [E]`` of the entries of one gallery camera.

  ``er [E]``: each entry's row (probe position in window order), non-decreasing, and
  descending ``ev [E]`` (float32 scores) within a row; ``et [E]``: gallery times;
  ``lo, hi [P]``: each row's window ``[lo, hi)`` of rows.
  """
  p, cap = len(lo), 2 * k
  cum = np.zeros(p + 1, np.int64)  # row r's entries are er[cum[r]:cum[r + 1]]
  np.cumsum(np.bincount(er, minlength=p), out=cum[1:])
  rank = np.arange(len(er)) - cum[er]
  keep = rank < cap
  v0 = np.full((p, cap), -np.inf, np.float32)
  t0 = np.zeros((p, cap))
  v0[er[keep], rank[keep]] = ev[keep]
  t0[er[keep], rank[keep]] = et[keep]

  n_rows = hi - lo
  levels = int(n_rows.max()).bit_length()
  vals, times = [v0], [t0]  # level j: top-cap of rows [r, r + 2^j), clipped at p
  for j in range(1, levels):
    shift = 1 << (j - 1)
    v_next = np.full_like(v0, -np.inf)
    t_next = np.zeros_like(t0)
    v_next[: p - shift] = vals[-1][shift:]
    t_next[: p - shift] = times[-1][shift:]
    v, t = _top(
      np.concatenate([vals[-1], v_next], axis=1),
      np.concatenate([times[-1], t_next], axis=1),
      cap,
    )
    vals.append(v)
    times.append(t)

  # The window [lo, hi) as disjoint pieces, one per set bit of its length (longest at lo).
  cand_v, cand_t, cut, last = [], [], [], []
  for j in range(levels):
    has = ((n_rows >> j) & 1).astype(bool)
    start = lo + ((n_rows >> (j + 1)) << (j + 1))
    end = np.minimum(start + (1 << j), p)
    start = np.minimum(start, p - 1)  # only where `has` is False
    cand_v.append(np.where(has[:, None], vals[j][start], -np.inf))
    cand_t.append(times[j][start])
    cut.append(has & (cum[end] - cum[start] > cap))  # this piece's list dropped entries
    last.append(vals[j][start, -1])
  cand_v, cand_t = np.concatenate(cand_v, axis=1), np.concatenate(cand_t, axis=1)
  cut, last = np.stack(cut, axis=1), np.stack(last, axis=1)

  block_size = cum[hi] - cum[lo]
  kth = -np.partition(-cand_v, k - 1, axis=1)[:, k - 1]
  thr = np.where(block_size > k, kth, -np.inf).astype(np.float32)
  is_pivot = (cand_v >= thr[:, None]) & (cand_v > -np.inf)
  n_pivot = is_pivot.sum(axis=1)
  if cand_v.shape[1] > cap:  # the pivots, unless flagged below, are among the cap largest
    sel = np.argpartition(-cand_v, cap - 1, axis=1)[:, :cap]
    is_pivot = np.take_along_axis(is_pivot, sel, axis=1)
    cand_t = np.take_along_axis(cand_t, sel, axis=1)
  # A dropped entry is at most its list's last value, and only a tie can make that >= thr (a
  # list of 2k values above thr would put the k-th largest above thr).
  exact = (n_pivot > cap) | (cut & (last >= thr[:, None])).any(axis=1)
  exact &= cum[1:] > cum[:-1]  # rows with entries in this camera only

  pivot_t = np.where(is_pivot, cand_t, np.inf)  # exp(-inf) = 0 leaves non-pivots out
  w = np.empty(len(er))
  step = max(1, _CHUNK // cap)
  for a in range(0, len(er), step):
    b = a + step
    d = pivot_t[er[a:b]] - et[a:b, None]
    w[a:b] = np.exp(d * d * neg_inv).sum(axis=1)
  w /= np.minimum(n_pivot, cap)[er]  # >= 1: a row with entries has a non-empty block

  rows = np.flatnonzero(exact)  # rare: heavy ties; pivots from the whole blocks
  if rows.size:
    _exact_weights(rows, thr[rows], cum, lo, hi, ev, et, neg_inv, w)
  return w


def temporal_lift_lists(
  score,
  index,
  query_cams,
  query_times,
  gallery_cams,
  gallery_times,
  tau: float = 100.0,
  sigma: float = 200.0,
  k: int = 10,
  alpha: float = 0.2,
) -> np.ndarray:
  """Lifted scores ``[P, K]`` float32 of the listed entries (see the module docstring).

  Args:
    score: ``[P, K]`` similarity of each probe to the gallery columns ``index``; finite.
    index: ``[P, K]`` int gallery columns in ``[0, G)``, distinct within a row, any order.
      Columns a row does not list are absent: they neither get a score nor join any block.
    query_cams, query_times: ``[P]``; gallery_cams, gallery_times: ``[G]``; times in
      seconds, all finite (any epoch: only differences are used, in float64).
    tau, sigma, k, alpha: as ``tlift.temporal_lift`` (the official defaults).

  Memory is ``O(P K + P k log2(window))``, never ``[P, G]``.
  """
  score, index, qc, qt, gc, gt = _check(
    score, index, query_cams, query_times, gallery_cams, gallery_times, tau, sigma, k
  )
  p, n = score.shape
  origin = min(qt.min(), gt.min())  # as the dense version, so windows are the same
  qt, gt = qt - origin, gt - origin
  order, lo, hi = _windows(qc, qt, tau)
  lo, hi = lo[order], hi[order]  # by row position in window order

  pos = np.empty(p, np.int64)
  pos[order] = np.arange(p)
  cams, cam_of = np.unique(gc, return_inverse=True)
  flat_row = np.repeat(pos, n)
  flat_cam = cam_of[index.ravel()]
  flat_s = score.ravel()
  # Entries by (gallery camera, row, descending score): a window's entries in one camera
  # are then contiguous, each row's largest first.
  ent = np.lexsort((-flat_s, flat_row, flat_cam))
  er, ec, ev = flat_row[ent], flat_cam[ent], flat_s[ent]
  et = gt[index.ravel()[ent]]
  bounds = np.searchsorted(ec, np.arange(len(cams) + 1))

  neg_inv = -1.0 / (float(sigma) * float(sigma))
  out = np.empty(p * n, np.float32)
  for c in range(len(cams)):  # a loop over gallery cameras
    a, b = bounds[c], bounds[c + 1]
    if a < b:
      w = _lift_camera(er[a:b], ev[a:b], et[a:b], lo, hi, int(k), neg_inv)
      out[ent[a:b]] = (w + alpha) * ev[a:b]
  return out.reshape(p, n)
