"""CMC, mAP and mINP under the Market-1501 protocol (docs/method.md §5).

For each query, gallery items with the same pid AND the same camera are removed; a query
with no positive left is skipped. Ranking is by ascending distance with ties broken by
gallery order (the first gallery column wins), on every platform.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from qaconv_jax.errors import ConfigError, DataError


def sort_keys(dist: np.ndarray) -> np.ndarray:
  """``[q, G]`` float32 -> uint64 keys whose plain sort is (distance, gallery index) order.

  The float bits are mapped to an order-preserving uint32 (flip all bits of negatives, the
  sign bit of positives) in the high half and the column in the low half: a total order
  with the documented tie-break, sorted by numpy's fast SIMD sort instead of a stable one.
  """
  d = np.ascontiguousarray(dist, np.float32) + np.float32(0.0)  # -0.0 -> +0.0
  bits = d.view(np.uint32)
  ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
  return (ordered << np.uint64(32)) | np.arange(dist.shape[1], dtype=np.uint64)[None, :]


def ranking_keys(dist, rows: np.ndarray) -> np.ndarray:
  """`sort_keys` of the rows ``rows`` of a dense ``[P, G]`` distance, or of a ranking
  object with its own ``sort_keys(rows)`` (two-stage retrieval's `ShortlistDistance`)."""
  if isinstance(dist, np.ndarray):
    return sort_keys(dist[rows])
  return dist.sort_keys(rows)


def _check(dist, query_pids, gallery_pids, query_cams, gallery_cams):
  if not isinstance(dist, np.ndarray) and hasattr(dist, "sort_keys"):
    values = dist.values  # only the shortlists' distances are stored
  else:
    dist = values = np.asarray(dist)
  if len(dist.shape) != 2:
    raise ValueError(f"dist must be [num_query, num_gallery], got shape {dist.shape}.")
  p, g = dist.shape
  if p == 0 or g == 0:
    raise ValueError(f"empty query or gallery: dist has shape {dist.shape}.")
  for name, arr, n in (
    ("query_pids", query_pids, p),
    ("query_cams", query_cams, p),
    ("gallery_pids", gallery_pids, g),
    ("gallery_cams", gallery_cams, g),
  ):
    if np.shape(arr) != (n,):
      raise ValueError(
        f"{name} must have length {n} to match dist {dist.shape}, got shape {np.shape(arr)}."
      )
  if not np.isfinite(values).all():
    bad = np.argwhere(~np.isfinite(values))[0]
    column = bad[1] if values is dist else dist.index[bad[0], bad[1]]  # a shortlist slot's item
    raise ValueError(f"dist holds NaN/Inf (first at query {bad[0]}, gallery {column}).")
  return dist


def _rank_chunk(dist, rows, qp, qc, gp, gc, ap_mode):
  """First-hit rank, AP and INP of the queries ``rows`` (-1 / NaN where no valid positive)."""
  g = dist.shape[1]
  order = (np.sort(ranking_keys(dist, rows), axis=1) & np.uint64(0xFFFFFFFF)).astype(np.int64)
  # Only same-pid items matter from here on: ~G/ids per query instead of G.
  r, c = np.nonzero(gp[order] == qp[rows, None])  # row-major: c ascending within a row
  removed = gc[order[r, c]] == qc[rows[r]]  # same pid AND same camera: not ranked
  hit = ~removed
  start = np.searchsorted(r, r)  # index of the first same-pid item of each item's row
  cum_removed = np.cumsum(removed) - removed  # removed items strictly before (global)
  cum_hits = np.cumsum(hit)
  pos = c - (cum_removed - cum_removed[start])  # rank among the kept items of the row
  k = cum_hits - (cum_hits[start] - hit[start])  # hits of the row up to and including
  r, pos, k = r[hit], pos[hit], k[hit].astype(np.float64)
  n = len(rows)
  n_hit = np.bincount(r, minlength=n)
  valid = n_hit > 0
  precision = k / (pos + 1.0)
  if ap_mode == "step":
    terms = precision
  else:  # trapezoid: mean of the precision just before the hit and at it
    terms = (np.where(pos > 0, (k - 1) / np.maximum(pos, 1), 1.0) + precision) / 2.0
  ap_sum = np.bincount(r, weights=terms, minlength=n)
  first = np.full(n, g)
  np.minimum.at(first, r, pos)
  last = np.full(n, -1)
  np.maximum.at(last, r, pos)
  return (
    np.where(valid, first, -1),
    np.where(valid, ap_sum / np.maximum(n_hit, 1), np.nan),
    np.where(valid, n_hit / np.maximum(last + 1.0, 1.0), np.nan),
  )


def evaluate_ranking(
  dist,
  query_pids,
  gallery_pids,
  query_cams,
  gallery_cams,
  max_rank: int = 100,
  ap_mode: str = "step",
  chunk: int = 256,
) -> dict:
  """Market-1501 protocol metrics.

  Args:
    dist: ``[P, G]`` distances (smaller = more similar), or a ranking object with
      ``shape`` and ``sort_keys(rows)`` (`two_stage.ShortlistDistance`).
    query_pids, query_cams: ``[P]``; gallery_pids, gallery_cams: ``[G]``.
    max_rank: length of the returned CMC curve.
    ap_mode: "step" (mean precision at each hit, = sklearn AP without ties) or "trapezoid"
      (the Market-1501 devkit / QAConv v1.0 PR-AUC: at each hit, the recall step times the
      mean of the precision just before and at the hit).
    chunk: queries sorted at a time (bounds memory to ``chunk * G`` keys per thread).

  Returns:
    ``{"cmc": [max_rank] float64, "mAP", "mINP", "num_valid_queries", "ap": [P] (NaN for
    skipped queries)}``.
  """
  if ap_mode not in ("step", "trapezoid"):
    raise ConfigError(f"ap_mode must be 'step' or 'trapezoid', got {ap_mode!r}.")
  dist = _check(dist, query_pids, gallery_pids, query_cams, gallery_cams)
  qp, qc = np.asarray(query_pids), np.asarray(query_cams)
  gp, gc = np.asarray(gallery_pids), np.asarray(gallery_cams)
  p = dist.shape[0]
  chunks = [np.arange(s, min(p, s + chunk)) for s in range(0, p, chunk)]
  # numpy's sort releases the GIL: one chunk per core at a time. A two-stage ranking also
  # holds a [chunk, G] cosine block per chunk (and runs a BLAS matmul): at most 4 at once.
  workers = os.cpu_count() or 1
  if not isinstance(dist, np.ndarray):
    workers = min(workers, 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    parts = list(pool.map(lambda rows: _rank_chunk(dist, rows, qp, qc, gp, gc, ap_mode), chunks))
  first_hit, ap, inp = (np.concatenate(x) for x in zip(*parts))
  valid = first_hit >= 0
  n_valid = int(valid.sum())
  if n_valid == 0:
    raise DataError(
      "no query has a valid positive in the gallery (same pid in another "
      "camera): check the ids and cameras."
    )
  cmc = np.zeros(max_rank)
  hits = first_hit[valid]
  np.add.at(cmc, hits[hits < max_rank], 1.0)
  return {
    "cmc": np.cumsum(cmc) / n_valid,
    "mAP": float(np.nanmean(ap)),
    "mINP": float(np.nanmean(inp)),
    "num_valid_queries": n_valid,
    "ap": ap,
  }
