"""The matcher on candidate lists (docs/method.md §13): each anchor map against its own K
candidates, for two-stage retrieval and neighbour-list re-ranking.

`match_maxima` scores every probe against every gallery map; a shortlist instead pairs each
anchor with K maps of its own. Scoring those with a vmap of the cross matcher runs as a
batch of small matmuls, ~3x slower on CPU than one large one, so here every anchor is one
plain 2-D matmul ``[K*hw, d] @ [d, hw]`` whose output keeps the candidate axis outermost
(both max-reductions then read it in cache order), and anchors go through ``lax.map``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _anchor_maxima(anchor: jax.Array, cands: jax.Array, precision) -> tuple[jax.Array, jax.Array]:
  """``anchor [hw, d]``, ``cands [K, hw, d]`` -> ``(best over anchor locations for each
  candidate location [K, hw], best over candidate locations for each anchor location [K, hw])``."""
  k, hw, d = cands.shape
  s = jnp.dot(
    cands.reshape(k * hw, d),
    anchor.T,
    precision=precision,
    preferred_element_type=jnp.float32,  # bfloat16 maps still accumulate in float32
  ).reshape(k, hw, hw)  # [K, hw(candidate r), hw(anchor s)]
  return s.max(axis=2), s.max(axis=1)


def match_maxima_lists(
  anchor: jax.Array,
  cands: jax.Array,
  anchor_is_probe: jax.Array,
  *,
  precision: jax.lax.Precision | None = HIGHEST,
  anchors_per_step: int = 1,
) -> jax.Array:
  """Best local matches of every (anchor, candidate) pair of candidate lists.

  Args:
    anchor: ``[B, h, w, d]`` unit maps.
    cands: ``[B, K, h, w, d]``: the K candidates of each anchor.
    anchor_is_probe: ``[B, K]`` bool: the anchor plays the probe in that pair (else the
      candidate does). QAConv's head weighs the two halves of the maxima differently, so
      the roles matter; the similarity matrix does not depend on them.
    precision: of the similarity dot.
    anchors_per_step: anchors vectorised together inside the loop (a runtime knob: 1 is
      fastest on CPU; accelerators may want more).

  Returns:
    ``[B, K, 2*h*w]`` float32 in `match_maxima`'s order for each pair's roles: first, for
    each gallery location, the best over probe locations; then, for each probe location,
    the best over gallery locations.
  """
  if anchor.ndim != 4 or cands.ndim != 5 or cands.shape[0] != anchor.shape[0]:
    raise ValueError(
      f"expected anchor [B, h, w, d] and cands [B, K, h, w, d]; got {anchor.shape}, {cands.shape}."
    )
  if cands.shape[2:] != anchor.shape[1:]:
    raise ValueError(
      f"anchor and candidate maps must share (h, w, d); got {anchor.shape[1:]} and "
      f"{cands.shape[2:]}."
    )
  if anchor_is_probe.shape != cands.shape[:2]:
    raise ValueError(
      f"anchor_is_probe must be [B, K] = {cands.shape[:2]}, got {anchor_is_probe.shape}."
    )
  b, k, h, w, d = cands.shape
  a = anchor.reshape(b, h * w, d)  # [B, hw, d]
  c = cands.reshape(b, k, h * w, d)  # [B, K, hw, d]
  one = lambda x: _anchor_maxima(x[0], x[1], precision)
  # batch_size=1 would still vmap each step: a batched dot, ~2x slower on CPU than a plain one.
  per_cand, per_anchor = (
    jax.lax.map(one, (a, c))
    if anchors_per_step == 1
    else jax.lax.map(one, (a, c), batch_size=anchors_per_step)
  )  # [B, K, hw] each
  probe_first = anchor_is_probe[..., None]  # [B, K, 1]
  # Anchor = probe: the gallery (candidate) locations' maxima come first.
  return jnp.concatenate(
    [
      jnp.where(probe_first, per_cand, per_anchor),
      jnp.where(probe_first, per_anchor, per_cand),
    ],
    axis=-1,
  )
