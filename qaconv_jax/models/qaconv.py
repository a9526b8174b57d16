"""Query-adaptive convolution: the matcher of QAConv (SPEC section 2).

For unit-length probe maps ``P [p, hw, d]`` and gallery maps ``G [g, hw, d]`` the cosine of
every pair of locations is ``S[p, g, s, r] = P[p, s] . G[g, r]``; QAConv keeps two global
max-poolings of it and feeds them to a BN-FC-BN head that outputs one logit per pair.

``S`` is ``hw`` times larger than anything else here (``[p, g, 192, 192]`` at 384x128), so
``match_maxima`` evaluates it tile by tile: a ``[tp, tg, hw, hw]`` tile is small enough to
stay in cache while it is max-reduced, and under autodiff each tile is recomputed in the
backward pass (``jax.checkpoint``) instead of keeping every tile alive.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from qaconv_jax.models.norm import BatchNorm

# (probe tile, gallery tile). Chosen with bench/bench_matching.py on a 2-core CPU; on a GPU
# larger tiles (or None: one einsum) are better. Configs set it explicitly.
DEFAULT_BLOCK = (4, 32)


def _check_maps(probe: jax.Array, gallery: jax.Array) -> None:
  if probe.ndim != 4 or gallery.ndim != 4:
    raise ValueError("match_maxima expects feature maps [n, h, w, d]; got probe "
                     f"{probe.shape} and gallery {gallery.shape}.")
  if probe.shape[1:] != gallery.shape[1:]:
    raise ValueError("probe and gallery maps must share (h, w, d); got probe "
                     f"{probe.shape[1:]} and gallery {gallery.shape[1:]}.")


def _similarity_tile(pt: jax.Array, gt: jax.Array) -> jax.Array:
  """``pt [tp, hw, d]``, ``gt [tg, hw, d]`` -> cosines ``[tp, hw, tg, hw]`` (p, s, g, r).

  One plain 2-D matmul ``[tp*hw, d] @ [d, tg*hw]``: on CPU this ran ~10% faster than the
  4-D einsum, whose output layout XLA had to transpose.
  """
  tp, hw, d = pt.shape
  tg = gt.shape[0]
  s = jnp.dot(pt.reshape(tp * hw, d), gt.reshape(tg * hw, d).T,
              preferred_element_type=jnp.float32)  # [tp*hw, tg*hw]
  return s.reshape(tp, hw, tg, hw)


def _maxima_tile(pt: jax.Array, gt: jax.Array) -> jax.Array:
  """``pt [tp, hw, d]``, ``gt [tg, hw, d]`` -> ``[tp, tg, 2hw]`` (gallery-indexed first)."""
  s = _similarity_tile(pt, gt)  # [tp, hw(s), tg, hw(r)]
  return jnp.concatenate([s.max(axis=1), s.max(axis=3).transpose(0, 2, 1)], axis=-1)


def _maxima_and_indices_tile(pt: jax.Array, gt: jax.Array):
  s = _similarity_tile(pt, gt)  # [tp, hw(s), tg, hw(r)]
  maxima = jnp.concatenate([s.max(axis=1), s.max(axis=3).transpose(0, 2, 1)], axis=-1)
  indices = jnp.concatenate([s.argmax(axis=1), s.argmax(axis=3).transpose(0, 2, 1)], axis=-1)
  return maxima, indices.astype(jnp.int32)


def _tiled(tile_fn: Callable, probe: jax.Array, gallery: jax.Array,
           block: tuple[int, int] | None):
  """Applies ``tile_fn`` over a grid of (probe tile x gallery tile) and stitches the result.

  ``probe [p, hw, d]``, ``gallery [g, hw, d]``; ``tile_fn`` returns pytrees of ``[tp, tg, k]``.
  Ragged edges are zero-padded and cut off again, so any ``p``, ``g`` work.
  """
  p, g = probe.shape[0], gallery.shape[0]
  if block is None or (p <= block[0] and g <= block[1]):
    return tile_fn(probe, gallery)
  tp, tg = min(block[0], p), min(block[1], g)
  n_p, n_g = -(-p // tp), -(-g // tg)
  hw, d = probe.shape[1:]
  pp = jnp.pad(probe, ((0, n_p * tp - p), (0, 0), (0, 0))).reshape(n_p, tp, hw, d)
  gg = jnp.pad(gallery, ((0, n_g * tg - g), (0, 0), (0, 0))).reshape(n_g, tg, hw, d)
  fn = jax.checkpoint(tile_fn)
  out = jax.lax.map(lambda pt: jax.lax.map(lambda gt: fn(pt, gt), gg), pp)  # [n_p,n_g,tp,tg,k]

  def stitch(x):
    k = x.shape[-1]
    x = x.transpose(0, 2, 1, 3, 4).reshape(n_p * tp, n_g * tg, k)  # [p_pad, g_pad, k]
    return x[:p, :g]
  return jax.tree.map(stitch, out)


def _flatten(probe, gallery):
  _check_maps(probe, gallery)
  n, h, w, d = probe.shape
  return probe.reshape(n, h * w, d), gallery.reshape(gallery.shape[0], h * w, d)


def match_maxima(probe: jax.Array, gallery: jax.Array, *,
                 block: tuple[int, int] | None = DEFAULT_BLOCK) -> jax.Array:
  """Best local matches of every probe x gallery pair.

  Args:
    probe: ``[p, h, w, d]`` maps, unit length over ``d``.
    gallery: ``[g, h, w, d]`` maps, unit length over ``d``.
    block: ``(tp, tg)`` tile of pairs evaluated at once, or None for one einsum.

  Returns:
    ``[p, g, 2*h*w]`` float32: ``[..., :hw]`` is, for each gallery location r, the best
    cosine over probe locations; ``[..., hw:]`` is, for each probe location s, the best over
    gallery locations (the official order: gallery-indexed half first).
  """
  pf, gf = _flatten(probe, gallery)
  return _tiled(_maxima_tile, pf, gf, block)


def match_maxima_with_indices(probe: jax.Array, gallery: jax.Array, *,
                              block: tuple[int, int] | None = DEFAULT_BLOCK):
  """``match_maxima`` plus the argmax locations: the local correspondences (paper Fig. 1b).

  Returns ``(maxima [p, g, 2hw] float32, indices [p, g, 2hw] int32)``: for ``r < hw``,
  ``indices[..., r]`` is the flat probe location matched to gallery location ``r``; for
  ``s < hw``, ``indices[..., hw + s]`` is the flat gallery location matched to probe
  location ``s``. Flat locations run row-major over ``(h, w)``.
  """
  pf, gf = _flatten(probe, gallery)
  return _tiled(_maxima_and_indices_tile, pf, gf, block)


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class QAConv(nn.Module):
  """Matcher + head: ``(probe [p,h,w,d], gallery [g,h,w,d], train) -> logits [p, g]``.

  head "v1" (the paper): scalar BN -> Dense(2hw -> 1) -> scalar BN.
  head "v2" (v2.1): scalar BN -> one Dense(hw -> 1) applied to both halves, summed -> BN.
  Initialisation follows PyTorch's ``nn.Linear`` (v2: weight filled with 1/hw).
  """
  head: str = "v1"
  block: tuple[int, int] | None = DEFAULT_BLOCK

  @nn.compact
  def __call__(self, probe: jax.Array, gallery: jax.Array, train: bool) -> jax.Array:
    if self.head not in ("v1", "v2"):
      raise ValueError(f"QAConv head must be 'v1' or 'v2', got {self.head!r}.")
    x = match_maxima(probe, gallery, block=self.block)  # [p, g, 2hw]
    hw = x.shape[-1] // 2
    x = BatchNorm(scalar=True, name="bn")(x, train)
    if self.head == "v1":
      fan_in = 2 * hw
      # kaiming_uniform(a=sqrt 5) == U(+-1/sqrt(fan_in)), PyTorch's Linear default.
      fc = nn.Dense(1, kernel_init=_uniform(fan_in**-0.5), bias_init=_uniform(fan_in**-0.5),
                    name="fc")
      logits = fc(x)[..., 0]  # [p, g]
    else:
      fc = nn.Dense(1, kernel_init=nn.initializers.constant(1.0 / hw),
                    bias_init=_uniform(hw**-0.5), name="fc")
      # Shared weights make the eval-mode score symmetric in (probe, gallery).
      logits = fc(x[..., :hw])[..., 0] + fc(x[..., hw:])[..., 0]  # [p, g]
    return BatchNorm(scalar=True, name="logit_bn")(logits, train)


def qaconv_score(logits: jax.Array) -> jax.Array:
  """Evaluation similarity in (0, 1): ``sigmoid(logit / 10)`` as in the official code."""
  return jax.nn.sigmoid(logits / 10.0)


def qaconv_distance(logits: jax.Array) -> jax.Array:
  """Evaluation distance ``1 - score``."""
  return 1.0 - qaconv_score(logits)


__all__ = ["match_maxima", "match_maxima_with_indices", "QAConv", "qaconv_score",
           "qaconv_distance", "DEFAULT_BLOCK"]
