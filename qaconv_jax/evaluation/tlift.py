"""Temporal Lifting (TLift), as the official code computes it (docs/method.md §7).

For probe i in camera c and every gallery camera g: the probes of camera c within ``tau``
seconds of i (i included) form a block ``B = score[C_i, gallery of g]``; the pivots are the
gallery columns of ALL entries of B at or above its K-th largest value (duplicates counted;
every entry when B has at most K); ``w[i, x] = mean over pivots j of exp(-(t_j - t_x)^2 /
sigma^2)`` for the gallery items x of camera g; the output is ``(w + alpha) * score``.

Vectorised: probes sorted by (camera, time) make C_i a contiguous window; the global
top-K of a block lies within the union of its rows' own top-K, so each row keeps its
top-2K per camera and each probe looks at its window's candidates only. When ties at the
K-th value could exceed those lists (a row's 2K-th value or the last pivot slot still at
the threshold), that (probe, camera) is flagged and recomputed exactly: ties always count.

Times stay float32 on the device (no x64), yet only DIFFERENCES of times enter the kernel:
the host subtracts the earliest time (float64) and splits each gallery time into a float32
pair ``hi = f32(t)``, ``lo = f32(t - hi)``. ``(hi_j - hi_x) + (lo_j - lo_x)`` then keeps
float32 relative precision of the difference itself whatever the absolute times (epoch
stamps ~1.7e9 s are 128 s apart in float32): nearby ``hi`` subtract exactly (Sterbenz).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _windows(cams: np.ndarray, times: np.ndarray, tau: float):
  """Sorting order of probes by (camera, time) and each probe's window ``[lo, hi)`` in it."""
  order = np.lexsort((times, cams))
  c, t = cams[order], times[order]
  lo = np.empty(len(order), np.int64)
  hi = np.empty(len(order), np.int64)
  for cam in np.unique(c):  # a loop over cameras, not probes
    s, e = np.searchsorted(c, cam, "left"), np.searchsorted(c, cam, "right")
    lo[s:e] = s + np.searchsorted(t[s:e], t[s:e] - tau, "right")  # t_b > t_i - tau
    hi[s:e] = s + np.searchsorted(t[s:e], t[s:e] + tau, "left")  # t_b < t_i + tau
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return order, lo[rank], hi[rank]  # windows indexed by ORIGINAL probe index


@functools.partial(jax.jit, static_argnames=("k", "chunk", "precision"))
def _lift(score, t_hi, t_lo, cam_cols, rows, in_window, *, k, sigma, alpha, chunk, precision):
  """``score [P, G]`` -> (lifted ``[P, G]``, tie-overflow flags ``[C, P]``).

  ``t_hi, t_lo [G]``: gallery times relative to the earliest time, as float32 pairs ``hi +
  lo`` (see the module docstring); ``cam_cols [C, Gm]``: gallery columns of each camera,
  padded with G (out of range); ``rows [P, W]``: the probes of each probe's window
  (``in_window`` masks the padding).
  """
  p, w = rows.shape
  g = score.shape[1]
  gm = cam_cols.shape[-1]
  kk = min(2 * k, gm)
  n_in_window = in_window.sum(axis=1)  # |C_i|

  def one_camera(args):
    s, th, tl, valid = args  # [P, Gm], [Gm], [Gm], [Gm]
    vals, idx = jax.lax.top_k(jnp.where(valid, s, -jnp.inf), kk)  # per-row top-kk [P, kk]
    win_vals = jnp.where(in_window[..., None], vals[rows], -jnp.inf)  # [P, W, kk]
    cand_v = win_vals.reshape(p, w * kk)
    cand_hi = th[idx][rows].reshape(p, w * kk)  # pivot times of the candidates, both parts
    cand_lo = tl[idx][rows].reshape(p, w * kk)
    top_v, top_i = jax.lax.top_k(cand_v, min(2 * k, w * kk))  # [P, L]
    top_hi = jnp.take_along_axis(cand_hi, top_i, axis=1)
    top_lo = jnp.take_along_axis(cand_lo, top_i, axis=1)
    entries = n_in_window * valid.sum()  # |B| = |C_i| * |gallery of g|
    thr = jnp.where(entries > k, top_v[:, min(k, top_v.shape[1]) - 1], -jnp.inf)
    pivot = (top_v >= thr[:, None]) & jnp.isfinite(top_v)  # [P, L]

    neg_inv = -1.0 / (sigma * sigma)  # a multiply in the exp: dividing there ran ~6x slower

    def weights(x):  # one probe; lax.map vmaps it over chunks, so [chunk, L, Gm] at most
      hi, lo, pv = x  # [L] pivot times (two parts), [L] 0/1
      # hi parts first: their difference is exact or one rounding of the difference itself;
      # subtracting whole times (hi + lo) would round them to their float32 spacing first.
      dt = (hi[:, None] - th[None, :]) + (lo[:, None] - tl[None, :])  # [L, Gm]
      return jnp.dot(pv, jnp.exp(jnp.square(dt) * neg_inv), precision=precision)  # [Gm]

    pv = pivot.astype(jnp.float32)
    wgt = jax.lax.map(weights, (top_hi, top_lo, pv), batch_size=chunk)
    wgt = wgt / jnp.sum(pv, axis=1, keepdims=True)
    # Could ties at the threshold reach beyond a row's list or the pivot slots? (The rows'
    # last listed values come from win_vals: a separate [P, W] gather of them ran ~8 s.)
    row_overflow = (kk < valid.sum()) & jnp.any(win_vals[..., kk - 1] >= thr[:, None], axis=1)
    slot_overflow = (top_v.shape[1] < w * kk) & (top_v[:, -1] >= thr)
    return (wgt + alpha) * s, row_overflow | slot_overflow

  lifted, flags = score, []
  for c in range(cam_cols.shape[0]):  # unrolled: cameras are few
    cols = cam_cols[c]
    s_c = jnp.take(score, cols, axis=1, mode="fill", fill_value=-jnp.inf)  # [P, Gm]
    th_c = jnp.take(t_hi, cols, mode="fill", fill_value=0.0)
    tl_c = jnp.take(t_lo, cols, mode="fill", fill_value=0.0)
    out, flag = one_camera((s_c, th_c, tl_c, cols < g))
    lifted = lifted.at[:, cols].set(out, mode="drop")  # padding columns are dropped
    flags.append(flag)
  return lifted, jnp.stack(flags)


def temporal_lift(
  score,
  query_cams,
  query_times,
  gallery_cams,
  gallery_times,
  tau: float = 100.0,
  sigma: float = 200.0,
  k: int = 10,
  alpha: float = 0.2,
  chunk: int = 256,
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Lifted similarity ``[P, G]`` float32 (see the module docstring).

  Args:
    score: ``[P, G]`` similarity (after re-ranking: ``1 - distance``).
    query_cams, query_times: ``[P]``; gallery_cams, gallery_times: ``[G]``; times in
      seconds, all finite.
    tau, sigma, k, alpha: the official defaults (the paper's text uses K = tau = sigma =
      100 and no alpha).
    precision: of the weight sums (`qaconv_jax.numerics`); HIGHEST by default, as JAX's
      own default would be TF32 on NVIDIA GPUs and one bf16 pass on TPU.
  """
  score = jnp.asarray(score, jnp.float32)
  if score.ndim != 2:
    raise ValueError(f"score must be [num_query, num_gallery], got {score.shape}.")
  p, g = score.shape
  qc, qt = np.asarray(query_cams), np.asarray(query_times, np.float64)
  gc, gt = np.asarray(gallery_cams), np.asarray(gallery_times, np.float64)
  for name, arr, n in (
    ("query_cams", qc, p),
    ("query_times", qt, p),
    ("gallery_cams", gc, g),
    ("gallery_times", gt, g),
  ):
    if arr.shape != (n,):
      raise ValueError(
        f"{name} must have length {n} to match score {score.shape}, got {arr.shape}."
      )
  if not (np.isfinite(qt).all() and np.isfinite(gt).all()):
    raise ValueError(
      "TLift needs a finite time stamp for every image; this set has none "
      "(or some are NaN): skip TLift for it."
    )
  if p == 0 or g == 0 or k < 1 or tau <= 0:
    raise ValueError(f"need a non-empty score (got {score.shape}), k >= 1 and tau > 0.")

  # Relative times, in float64 (the tie fallback below uses them too): the float32 pairs then
  # need no more range than the span of the times, whatever the clock's epoch.
  origin = min(qt.min(), gt.min())
  qt, gt = qt - origin, gt - origin
  order, lo, hi = _windows(qc, qt, tau)
  width = int((hi - lo).max())
  pos = np.minimum(lo[:, None] + np.arange(width)[None, :], p - 1)
  rows = order[pos]  # [P, W] original probe indices of each window
  in_window = np.arange(width)[None, :] < (hi - lo)[:, None]

  cams = np.unique(gc)  # only cameras that have gallery images
  cols = [np.flatnonzero(gc == c) for c in cams]
  gm = max(len(c) for c in cols)
  cam_cols = np.stack([np.pad(c, (0, gm - len(c)), constant_values=g) for c in cols])
  gt_hi = gt.astype(np.float32)
  gt_lo = (gt - gt_hi).astype(np.float32)  # the rest, exact in float64 before rounding
  lifted, overflow = _lift(
    score,
    jnp.asarray(gt_hi),
    jnp.asarray(gt_lo),
    jnp.asarray(cam_cols),
    jnp.asarray(rows),
    jnp.asarray(in_window),
    k=k,
    sigma=float(sigma),
    alpha=float(alpha),
    chunk=chunk,
    precision=precision,
  )
  overflow = np.asarray(overflow)
  if overflow.any():  # rare: heavy ties; redo those (probe, camera) blocks exactly
    lifted = np.array(lifted)
    s_np = np.asarray(score)
    for ci, i in zip(*np.nonzero(overflow)):
      block = s_np[np.ix_(rows[i][in_window[i]], cols[ci])]
      vals = np.sort(block.ravel())[::-1]
      thr = vals[k - 1] if vals.size > k else -np.inf
      pivot_t = gt[cols[ci][np.nonzero(block >= thr)[1]]]
      w = np.exp(-np.square(pivot_t[:, None] - gt[cols[ci]][None, :]) / sigma**2).mean(0)
      lifted[i, cols[ci]] = (w + alpha) * s_np[i, cols[ci]]
  return jnp.asarray(lifted)
