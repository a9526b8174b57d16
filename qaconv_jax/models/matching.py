"""The matcher of QAConv (docs/method.md §2): best local matches of every map pair.

For unit-length probe maps ``P [p, hw, d]`` and gallery maps ``G [g, hw, d]`` the cosine of
every pair of locations is ``S[p, g, s, r] = P[p, s] . G[g, r]``; QAConv keeps two global
max-poolings of it and feeds them to a BN-FC-BN head that outputs one logit per pair.

``S`` is ``hw`` times larger than anything else here (``[p, g, 192, 192]`` at 384x128), so
``match_maxima`` evaluates it tile by tile: a ``[tp, tg, hw, hw]`` tile stays in cache while
it is max-reduced and is never stored. The gradient of a maximum flows only to its argmax,
so the backward pass needs the argmax indices (int32 ``[p, g, 2hw]``), not ``S``: it gathers
and segment-sums ``O(p g hw d)`` values instead of redoing the ``O(p g hw^2 d)`` matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# (probe tile, gallery tile) of the XLA path. Chosen with bench/bench_matching.py on a
# 2-core CPU. block="auto" picks it on CPU and `ACCELERATOR_BLOCK` on GPU/TPU.
DEFAULT_BLOCK = (8, 16)
# A [16, 64, 192, 192] float32 tile is 151 MB: large enough to keep the tensor cores busy,
# small enough for XLA's unfused dot + reduce to stay a few hundred MB (unmeasured on GPU:
# bench/bench_accel.py measures it).
ACCELERATOR_BLOCK = (16, 64)
HIGHEST = jax.lax.Precision.HIGHEST
IMPLS = ("xla", "pallas")


class Options(NamedTuple):
  """Static settings of one matcher call: runtime knobs, none changes a value (beyond
  rounding, for ``precision``)."""

  block: tuple[int, int] | None
  impl: str
  precision: jax.lax.Precision | None


def resolve_options(block="auto", impl="xla", precision=HIGHEST, backend=None) -> Options:
  """``block`` "auto" -> the backend's tile; checks ``impl``."""
  if impl not in IMPLS:
    raise ValueError(f"match impl must be one of {IMPLS}, got {impl!r}.")
  backend = backend or jax.default_backend()
  if isinstance(block, str):
    if block != "auto":
      raise ValueError(f"match block must be 'auto', None or (tp, tg), got {block!r}.")
    if impl == "pallas":
      from qaconv_jax.models.matching_pallas import DEFAULT_BLOCK as DEFAULT_PALLAS_BLOCK

      block = DEFAULT_PALLAS_BLOCK
    else:
      block = DEFAULT_BLOCK if backend == "cpu" else ACCELERATOR_BLOCK
  elif block is not None:
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
      raise ValueError(f"match block must be two positive integer tile sizes, got {block!r}.")
    block = tuple(block)
    if len(block) != 2 or min(block) < 1:
      raise ValueError(f"match block must be two positive tile sizes, got {block!r}.")
  if impl == "pallas" and block is None:
    raise ValueError("the Pallas matcher needs a (tp, tg) block, not None.")
  return Options(block, impl, precision)


def _check_maps(probe: jax.Array, gallery: jax.Array) -> None:
  if probe.ndim != 4 or gallery.ndim != 4:
    raise ValueError(
      "match_maxima expects feature maps [n, h, w, d]; got probe "
      f"{probe.shape} and gallery {gallery.shape}."
    )
  if probe.shape[1:] != gallery.shape[1:]:
    raise ValueError(
      "probe and gallery maps must share (h, w, d); got probe "
      f"{probe.shape[1:]} and gallery {gallery.shape[1:]}."
    )


def _similarity_tile(pt: jax.Array, gt: jax.Array, precision=HIGHEST) -> jax.Array:
  """``pt [tp, hw, d]``, ``gt [tg, hw, d]`` -> cosines ``[tp, hw, tg, hw]`` (p, s, g, r).

  One plain 2-D matmul ``[tp*hw, d] @ [d, tg*hw]``: on CPU this ran ~10% faster than the
  4-D einsum, whose output layout XLA had to transpose.
  """
  tp, hw, d = pt.shape
  tg = gt.shape[0]
  s = jnp.dot(
    pt.reshape(tp * hw, d),
    gt.reshape(tg * hw, d).T,
    precision=precision,
    preferred_element_type=jnp.float32,  # bfloat16 maps still accumulate in float32
  )  # [tp*hw, tg*hw]
  return s.reshape(tp, hw, tg, hw)


def _maxima_tile(pt: jax.Array, gt: jax.Array, precision=HIGHEST) -> jax.Array:
  """``pt [tp, hw, d]``, ``gt [tg, hw, d]`` -> ``[tp, tg, 2hw]`` (gallery-indexed first)."""
  s = _similarity_tile(pt, gt, precision)  # [tp, hw(s), tg, hw(r)]
  return jnp.concatenate([s.max(axis=1), s.max(axis=3).transpose(0, 2, 1)], axis=-1)


def _maxima_and_indices_tile(pt: jax.Array, gt: jax.Array, precision=HIGHEST):
  """``_maxima_tile`` plus the FIRST argmax of each maximum, int32 ``[tp, tg, 2hw]``.

  Found as a min-reduce of ``where(s == max, location, hw)`` after the max: two plain
  reductions that XLA fuses, ~4x faster on CPU than its variadic argmax reduction.
  """
  s = _similarity_tile(pt, gt, precision)  # [tp, hw(s), tg, hw(r)]
  hw = s.shape[1]
  best_for_gallery = s.max(axis=1)  # [tp, tg, hw(r)]
  best_for_probe = s.max(axis=3)  # [tp, hw(s), tg]
  loc_s = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  loc_r = jax.lax.broadcasted_iota(jnp.int32, s.shape, 3)
  idx_g = jnp.min(jnp.where(s == best_for_gallery[:, None], loc_s, hw), axis=1)  # [tp,tg,hw]
  idx_p = jnp.min(jnp.where(s == best_for_probe[..., None], loc_r, hw), axis=3)  # [tp,hw,tg]
  maxima = jnp.concatenate([best_for_gallery, best_for_probe.transpose(0, 2, 1)], axis=-1)
  indices = jnp.concatenate([idx_g, idx_p.transpose(0, 2, 1)], axis=-1)
  return maxima, jnp.minimum(indices, hw - 1)  # NaN similarities would leave hw: clamp


def _grid(p: int, g: int, block: tuple[int, int] | None) -> tuple[int, int, int, int]:
  """Tile sizes and counts ``(tp, tg, n_p, n_g)`` covering ``p x g`` pairs."""
  tp, tg = (p, g) if block is None else (min(block[0], p), min(block[1], g))
  return tp, tg, -(-p // tp), -(-g // tg)


def _tiles(x: jax.Array, n: int, t: int) -> jax.Array:
  """``[m, ...]`` -> zero-padded ``[n, t, ...]``."""
  x = jnp.pad(x, ((0, n * t - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape(n, t, *x.shape[1:])


def _tiled(tile_fn: Callable, probe: jax.Array, gallery: jax.Array, block: tuple[int, int] | None):
  """Applies ``tile_fn`` over a grid of (probe tile x gallery tile) and stitches the result.

  ``probe [p, hw, d]``, ``gallery [g, hw, d]``; ``tile_fn`` returns pytrees of ``[tp, tg, k]``.
  Ragged edges are zero-padded and cut off again, so any ``p``, ``g`` work.
  """
  p, g = probe.shape[0], gallery.shape[0]
  tp, tg, n_p, n_g = _grid(p, g, block)
  if n_p == n_g == 1:
    return tile_fn(probe, gallery)
  pp, gg = _tiles(probe, n_p, tp), _tiles(gallery, n_g, tg)  # [n_p,tp,hw,d], [n_g,tg,hw,d]
  out = jax.lax.map(lambda pt: jax.lax.map(lambda gt: tile_fn(pt, gt), gg), pp)

  def stitch(x):  # [n_p, n_g, tp, tg, k] -> [p, g, k]
    x = x.transpose(0, 2, 1, 3, 4).reshape(n_p * tp, n_g * tg, x.shape[-1])
    return x[:p, :g]

  return jax.tree.map(stitch, out)


def _tile_grads(pt, gt, cot, idx, want_p: bool, want_g: bool, precision=HIGHEST):
  """Cotangents of one tile's maxima w.r.t. its maps (only those asked for; else None).

  ``pt [tp, hw, d]``, ``gt [tg, hw, d]``, ``cot``/``idx [tp, tg, 2hw]`` -> ``(dP [tp, hw, d],
  dG [tg, hw, d])``. Gallery-indexed maximum r was ``P[s_idx] . G[r]``; probe-indexed
  maximum s was ``P[s] . G[r_idx]``: each feeds the other side of its own product.
  """
  tp, hw, d = pt.shape
  tg = gt.shape[0]
  a, b = cot[..., :hw], cot[..., hw:]  # [tp, tg, hw] each
  s_idx, r_idx = idx[..., :hw], idx[..., hw:]
  pi = jnp.arange(tp)[:, None, None]
  gi = jnp.arange(tg)[None, :, None]
  d_p = d_g = None
  if want_p:
    # b [tp, tg, hw] x gathered G rows [tp, tg, hw, d]
    d_p = jnp.einsum("pgs,pgsd->psd", b, gt[gi, r_idx], precision=precision)
    d_p += jax.ops.segment_sum(
      (a[..., None] * gt[None]).reshape(-1, d),  # [tp*tg*hw, d]
      (pi * hw + s_idx).reshape(-1),
      num_segments=tp * hw,
    ).reshape(tp, hw, d)
  if want_g:
    # a [tp, tg, hw] x gathered P rows [tp, tg, hw, d]
    d_g = jnp.einsum("pgr,pgrd->grd", a, pt[pi, s_idx], precision=precision)
    d_g += jax.ops.segment_sum(
      (b[..., None] * pt[:, None]).reshape(-1, d),
      (gi * hw + r_idx).reshape(-1),
      num_segments=tg * hw,
    ).reshape(tg, hw, d)
  return d_p, d_g


def _tiled_grads(
  probe, gallery, idx, cot, block, want_p: bool = True, want_g: bool = True, precision=HIGHEST
):
  """``[p, hw, d]``, ``[g, hw, d]``, ``idx``/``cot [p, g, 2hw]`` -> ``(dP, dG)``, tile by tile.

  Padded pairs carry a zero cotangent, so they add nothing. An unwanted side is None and
  costs nothing (training never differentiates the class memory).
  """
  p, g = probe.shape[0], gallery.shape[0]
  tp, tg, n_p, n_g = _grid(p, g, block)
  pp, gg = _tiles(probe, n_p, tp), _tiles(gallery, n_g, tg)

  def pair_tiles(x):  # [p, g, 2hw] -> [n_p, n_g, tp, tg, 2hw]
    x = _tiles(jnp.swapaxes(_tiles(x, n_p, tp), 0, 2), n_g, tg)  # [n_g, tg, tp, n_p, 2hw]
    return x.transpose(3, 0, 2, 1, 4)

  idx_t, cot_t = pair_tiles(idx), pair_tiles(cot.astype(jnp.float32))

  def probe_row(d_gallery, row):
    pt, idx_row, cot_row = row

    def gallery_tile(d_pt, col):
      gt, it, ct = col
      d_p, d_g = _tile_grads(pt, gt, ct, it, want_p, want_g, precision)
      return (d_pt + d_p if want_p else d_pt), d_g

    d_pt0 = jnp.zeros(pt.shape, jnp.float32) if want_p else None
    d_pt, d_gs = jax.lax.scan(gallery_tile, d_pt0, (gg, idx_row, cot_row))
    return (d_gallery + d_gs if want_g else d_gallery), d_pt

  d_gallery0 = jnp.zeros(gg.shape, jnp.float32) if want_g else None
  d_gallery, d_probe = jax.lax.scan(probe_row, d_gallery0, (pp, idx_t, cot_t))
  if want_p:
    d_probe = d_probe.reshape(n_p * tp, *probe.shape[1:])[:p].astype(probe.dtype)
  if want_g:
    d_gallery = d_gallery.reshape(n_g * tg, *gallery.shape[1:])[:g].astype(gallery.dtype)
  return d_probe, d_gallery


def _forward(probe, gallery, opts: Options, with_indices: bool):
  """``[p, hw, d]`` x ``[g, hw, d]`` -> maxima ``[p, g, 2hw]`` (and first-argmax indices)."""
  if opts.impl == "pallas":
    from qaconv_jax.models.matching_pallas import pallas_maxima

    return pallas_maxima(
      probe,
      gallery,
      block=opts.block,
      with_indices=with_indices,
      interpret=jax.default_backend() == "cpu",  # CI: the same kernel, interpreted
      precision=opts.precision,
    )
  tile = _maxima_and_indices_tile if with_indices else _maxima_tile
  return _tiled(functools.partial(tile, precision=opts.precision), probe, gallery, opts.block)


# symbolic_zeros: the inputs come wrapped with ``.perturbed``, so the backward pass skips
# the side that is not differentiated (the class memory, in training). ``wanted`` is static:
# part of the residuals' pytree structure.
def _wanted(probe, gallery) -> dict:
  return {k: () for k, v in (("p", probe.perturbed), ("g", gallery.perturbed)) if v}


def _zeros_for_absent(probe, gallery, d_p, d_g):
  return (
    jnp.zeros_like(probe) if d_p is None else d_p,
    jnp.zeros_like(gallery) if d_g is None else d_g,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _match_maxima_flat(probe, gallery, opts):
  return _forward(probe, gallery, opts, with_indices=False)


def _match_maxima_fwd(probe, gallery, opts):
  maxima, idx = _forward(probe.value, gallery.value, opts, with_indices=True)
  return maxima, (probe.value, gallery.value, idx, _wanted(probe, gallery))


def _match_maxima_bwd(opts, residuals, cot):
  probe, gallery, idx, wanted = residuals
  d_p, d_g = _tiled_grads(
    probe, gallery, idx, cot, opts.block, "p" in wanted, "g" in wanted, opts.precision
  )
  return _zeros_for_absent(probe, gallery, d_p, d_g)


_match_maxima_flat.defvjp(_match_maxima_fwd, _match_maxima_bwd, symbolic_zeros=True)


# The gallery split over a mesh axis (the class memory in data-parallel training): every
# device matches the whole (gathered, small) batch against its own gallery rows, so the
# gallery never moves; the maxima come out split over the same axis on their gallery axis.
def _shard(fn, in_specs, out_specs):
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _match_maxima_sharded(probe, gallery, opts, axis):
  fn = lambda p, g: _forward(p, g, opts, with_indices=False)
  return _shard(fn, (P(), P(axis)), P(None, axis))(probe, gallery)


def _match_maxima_sharded_fwd(probe, gallery, opts, axis):
  fn = lambda p, g: _forward(p, g, opts, with_indices=True)
  spec = P(None, axis)  # [p, g, 2hw] split on g
  maxima, idx = _shard(fn, (P(), P(axis)), (spec, spec))(probe.value, gallery.value)
  return maxima, (probe.value, gallery.value, idx, _wanted(probe, gallery))


def _match_maxima_sharded_bwd(opts, axis, residuals, cot):
  probe, gallery, idx, wanted = residuals
  want_p, want_g = "p" in wanted, "g" in wanted

  def local(p, g, i, c):  # one device's gallery rows
    d_p, d_g = _tiled_grads(p, g, i, c, opts.block, want_p, want_g, opts.precision)
    # Each device saw every probe against its gallery rows only: the probe's gradient is
    # the sum over devices.
    return (None if d_p is None else jax.lax.psum(d_p, axis)), d_g

  spec = P(None, axis)
  d_p, d_g = _shard(local, (P(), P(axis), spec, spec), (P(), P(axis)))(probe, gallery, idx, cot)
  return _zeros_for_absent(probe, gallery, d_p, d_g)


_match_maxima_sharded.defvjp(
  _match_maxima_sharded_fwd, _match_maxima_sharded_bwd, symbolic_zeros=True
)


def _flatten(probe, gallery):
  _check_maps(probe, gallery)
  n, h, w, d = probe.shape
  return probe.reshape(n, h * w, d), gallery.reshape(gallery.shape[0], h * w, d)


def match_maxima(
  probe: jax.Array,
  gallery: jax.Array,
  *,
  block: tuple[int, int] | str | None = "auto",
  impl: str = "xla",
  precision: jax.lax.Precision | None = HIGHEST,
  gallery_axis: str | None = None,
) -> jax.Array:
  """Best local matches of every probe x gallery pair.

  Args:
    probe: ``[p, h, w, d]`` maps, unit length over ``d`` (float32 or bfloat16).
    gallery: ``[g, h, w, d]`` maps, unit length over ``d``.
    block: ``(tp, tg)`` tile of pairs evaluated at once, None for one einsum (XLA only),
      or "auto": the backend's tile (`resolve_options`).
    impl: "xla" (tiles of ``dot`` + max) or "pallas" (one fused kernel,
      `qaconv_jax.models.matching_pallas`; interpreted on CPU). Same values either way.
    precision: of the similarity dot (and of the backward's); HIGHEST = true float32.
    gallery_axis: a mesh axis the gallery is split over (rows), or None. Needs the mesh
      set (``jax.set_mesh``); the result is then split over it on its gallery axis.

  Returns:
    ``[p, g, 2*h*w]`` float32: ``[..., :hw]`` is, for each gallery location r, the best
    cosine over probe locations; ``[..., hw:]`` is, for each probe location s, the best over
    gallery locations (the official order: gallery-indexed half first).

  Differentiable w.r.t. both maps; as with PyTorch's ``max(dim)``, each maximum's gradient
  goes to one argmax (the first on exact ties).
  """
  pf, gf = _flatten(probe, gallery)  # [p, hw, d], [g, hw, d]
  opts = resolve_options(block, impl, precision)
  if gallery_axis is None:
    return _match_maxima_flat(pf, gf, opts)
  return _match_maxima_sharded(pf, gf, opts, gallery_axis)


def match_maxima_with_indices(
  probe: jax.Array,
  gallery: jax.Array,
  *,
  block: tuple[int, int] | str | None = "auto",
  impl: str = "xla",
  precision: jax.lax.Precision | None = HIGHEST,
):
  """``match_maxima`` plus the argmax locations: the local correspondences (paper Fig. 1b).

  Returns ``(maxima [p, g, 2hw] float32, indices [p, g, 2hw] int32)``: for ``r < hw``,
  ``indices[..., r]`` is the flat probe location matched to gallery location ``r``; for
  ``s < hw``, ``indices[..., hw + s]`` is the flat gallery location matched to probe
  location ``s``. Flat locations run row-major over ``(h, w)``.
  """
  pf, gf = _flatten(probe, gallery)
  return _forward(pf, gf, resolve_options(block, impl, precision), with_indices=True)
