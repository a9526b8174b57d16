"""A fused Pallas matcher: ``matching._maxima_and_indices_tile`` without the similarity maps.

Layout. The maps are zero-padded to ``probe [P, HW, D]``, ``gallery [G, HW, D]`` and the
grid is ``(P / tp, G / tg)``: program ``(i, j)`` sees the probe tile ``[tp, HW, D]`` and
the gallery tile ``[tg, HW, D]`` (block index ``(i, 0, 0)`` / ``(j, 0, 0)``) and writes the
output tile ``[tp, tg, 2HW]`` (``(i, j, 0)``). Inside, a loop over its ``tp x tg`` pairs
cuts each pair's map ``S = P_a @ G_b^T [HW(s), HW(r)]`` into ``[c, c]`` chunks: each chunk
is one 2-D float32-accumulated dot, max-reduced along both axes (the first argmax is a
min-reduce of ``where(S == max, location, big)``, as in the XLA path) and folded into
running results, ascending in location, that only a strictly larger chunk maximum replaces,
so the lowest location wins exact ties. Only ``[tp, tg, 2HW]`` maxima (and int32 indices)
reach HBM; ``S`` lives in registers / VMEM one chunk at a time.

Padding (``_plan``), decided by ``jax.default_backend()``:
  * GPU (Triton, forced via its compiler params; also used on CPU, i.e. interpret mode):
    every loaded or computed array must have a power-of-two size and a ``dot`` needs at
    least 16 in each dim, so ``HW = round_up(hw, 16)``, ``c`` = the largest power of two
    <= 64 dividing ``HW`` (hw 8 -> 16 = 1 chunk; 128 -> 2x2 chunks of 64; 192 -> 3x3 of 64,
    no padding) and ``D = next_pow2(max(d, 16))``. Blocks themselves need not be powers of
    two, so ``tp``, ``tg`` are free.
  * TPU (Mosaic): the last two dims of a block must be multiples of (8, 128) or the full
    dim: ``HW`` and ``D`` are rounded up to multiples of 128, one chunk ``c = HW``, and
    ``tg`` is rounded up to a multiple of 8 unless one tile covers the gallery.
Padded locations are masked to ``-inf`` (only in the last chunk, which always holds a real
location), so they never win a max nor an argmax; padded maps and pairs are cut off.

Limits. Per GPU program the live state is one ``[c, c]`` float32 chunk plus its int32
location map (16 KiB each at c = 64) and two ``[c, D]`` dot operands staged in shared
memory (2 x 32 KiB at D = 128, float32): fits every GPU since Ampere. ``tp x tg`` only sets
the sequential work per program (and the reuse of the tiles through L1/L2), not memory;
``DEFAULT_BLOCK = (8, 8)`` keeps hundreds of programs in flight for the training shapes
(64 x ~750) and far more at evaluation. On TPU the VMEM blocks are ``(tp + tg) HW D`` inputs
(double-buffered) plus the ``[HW, HW]`` chunk: ~5 MiB at (8, 8), HW = 256, D = 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_BLOCK = (8, 8)
_GPU_MAX_CHUNK = 64  # a [64, 64] float32 accumulator: few registers per thread at 4 warps


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _plan(p: int, g: int, hw: int, d: int, block: tuple[int, int], backend: str):
  """Padded sizes ``(tp, tg, P, G, HW, D, c)`` for ``backend`` (see the module docstring)."""
  tp, tg = min(block[0], p), min(block[1], g)
  if backend == "tpu":
    hw_pad, d_pad = _round_up(hw, 128), _round_up(d, 128)
    chunk = hw_pad
    tg = g if _round_up(tg, 8) >= g else _round_up(tg, 8)
  else:
    hw_pad, d_pad = _round_up(hw, 16), max(16, pl.next_power_of_2(d))
    chunk = _GPU_MAX_CHUNK
    while hw_pad % chunk:
      chunk //= 2
  return tp, tg, _round_up(p, tp), _round_up(g, tg), hw_pad, d_pad, chunk


def _compiler_params(backend: str):
  if backend == "gpu":  # Triton: Mosaic GPU (the default) wants Hopper and other kernels
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4)
  if backend == "tpu":  # independent tiles: let megacore chips split both grid axes
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  return None


def _chunk_best(s: jax.Array, axis: int, offset: int, with_indices: bool):
  """Max of ``s [c, c]`` along ``axis`` ``[c]`` and its first location (+ ``offset``)."""
  m = s.max(axis=axis)
  if not with_indices:
    return m, None
  loc = jax.lax.broadcasted_iota(jnp.int32, s.shape, axis) + offset
  hit = s == jnp.expand_dims(m, axis)
  return m, jnp.min(jnp.where(hit, loc, jnp.iinfo(jnp.int32).max), axis=axis)


def _fold(best, new):
  """Running (max, first argmax) over chunks visited in ascending location order."""
  if best is None:
    return new
  (m0, i0), (m1, i1) = best, new
  m = jnp.maximum(m0, m1)  # NaN-propagating, like XLA's max-reduce
  return m, None if i0 is None else jnp.where(m1 > m0, i1, i0)


def _kernel(p_ref, g_ref, *out_refs, tp, tg, hw, chunk, precision, with_indices):
  """Refs: ``p_ref [tp, HW, D]``, ``g_ref [tg, HW, D]``, outputs ``[tp, tg, 2HW]``."""
  hw_pad = p_ref.shape[1]
  n_c = hw_pad // chunk
  max_ref = out_refs[0]
  idx_ref = out_refs[1] if with_indices else None

  def masked(s, sc, rc):  # padded locations exist only in the last chunk of each axis
    if (sc + 1) * chunk > hw:
      s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) + sc * chunk < hw, s, -jnp.inf)
    if (rc + 1) * chunk > hw:
      s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) + rc * chunk < hw, s, -jnp.inf)
    return s

  def store(a, b, offset, best):
    m, i = best
    max_ref[a, b, pl.ds(offset, chunk)] = m
    if with_indices:  # a NaN maximum matches no location: XLA's clamped hw - 1
      idx_ref[a, b, pl.ds(offset, chunk)] = jnp.where(jnp.isnan(m), hw - 1, i)

  def pair(a, b):
    by_r = [None] * n_c  # gallery-indexed results per r chunk, folded over s chunks
    for sc in range(n_c):
      by_s = None  # probe-indexed results of this s chunk, folded over r chunks
      p_chunk = p_ref[a, pl.ds(sc * chunk, chunk), :]  # [c, D]
      for rc in range(n_c):
        g_chunk = g_ref[b, pl.ds(rc * chunk, chunk), :]  # [c, D]
        s = jax.lax.dot_general(  # [c(s), c(r)]: contract D of both, no explicit transpose
          p_chunk,
          g_chunk,
          (((1,), (1,)), ((), ())),
          precision=precision,
          preferred_element_type=jnp.float32,
        )
        s = masked(s, sc, rc)
        by_r[rc] = _fold(by_r[rc], _chunk_best(s, 0, sc * chunk, with_indices))
        by_s = _fold(by_s, _chunk_best(s, 1, rc * chunk, with_indices))
      store(a, b, hw_pad + sc * chunk, by_s)
    for rc in range(n_c):
      store(a, b, rc * chunk, by_r[rc])

  def probe_row(a, carry):
    def gallery_col(b, inner):
      pair(a, b)
      return inner

    return jax.lax.fori_loop(0, tg, gallery_col, carry)

  # Loops, not unrolled Python: a (8, 8) tile at hw = 192 would otherwise be 576 dots.
  jax.lax.fori_loop(0, tp, probe_row, 0)


@functools.partial(
  jax.jit, static_argnames=("block", "with_indices", "interpret", "precision", "backend")
)
def _pallas_maxima(probe, gallery, *, block, with_indices, interpret, precision, backend):
  (p, hw, d), g = probe.shape, gallery.shape[0]
  tp, tg, p_pad, g_pad, hw_pad, d_pad, chunk = _plan(p, g, hw, d, block, backend)
  dtype = jnp.promote_types(probe.dtype, gallery.dtype)

  def pad(x, n):  # zeros: padded d adds nothing to a dot, padded maps/locations are cut
    return jnp.pad(x.astype(dtype), ((0, n - x.shape[0]), (0, hw_pad - hw), (0, d_pad - d)))

  out_block = pl.BlockSpec((tp, tg, 2 * hw_pad), lambda i, j: (i, j, 0))
  out_shape = [jax.ShapeDtypeStruct((p_pad, g_pad, 2 * hw_pad), jnp.float32)]
  if with_indices:
    out_shape.append(jax.ShapeDtypeStruct((p_pad, g_pad, 2 * hw_pad), jnp.int32))
  kernel = functools.partial(
    _kernel,
    tp=tp,
    tg=tg,
    hw=hw,
    chunk=chunk,
    precision=precision,
    with_indices=with_indices,
  )
  outs = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(p_pad // tp, g_pad // tg),
    in_specs=[
      pl.BlockSpec((tp, hw_pad, d_pad), lambda i, j: (i, 0, 0)),
      pl.BlockSpec((tg, hw_pad, d_pad), lambda i, j: (j, 0, 0)),
    ],
    out_specs=[out_block] * len(out_shape),
    interpret=interpret,
    compiler_params=None if interpret else _compiler_params(backend),
    name="qaconv_maxima",
  )(pad(probe, p_pad), pad(gallery, g_pad))

  def cut(x):  # [P, G, 2HW] -> [p, g, 2hw]
    x = x[:p, :g]
    if hw_pad == hw:
      return x
    return jnp.concatenate([x[..., :hw], x[..., hw_pad : hw_pad + hw]], axis=-1)

  outs = [cut(x) for x in outs]
  return tuple(outs) if with_indices else outs[0]


def pallas_maxima(
  probe: jax.Array,
  gallery: jax.Array,
  *,
  block: tuple[int, int] = DEFAULT_BLOCK,
  with_indices: bool,
  interpret: bool,
  precision=jax.lax.Precision.HIGHEST,
):
  """Best local matches of every pair in one fused kernel (no ``[hw, hw]`` map in HBM).

  Args:
    probe: ``[p, hw, d]`` flattened maps, float32 or bfloat16.
    gallery: ``[g, hw, d]`` flattened maps, same ``hw`` and ``d``.
    block: ``(tp, tg)`` pairs per program (clamped to ``(p, g)``).
    with_indices: also return the first argmax of each maximum.
    interpret: run the kernel as plain JAX ops (the only way on CPU).
    precision: of the float32-accumulated dots.

  Returns:
    ``maxima [p, g, 2hw]`` float32 (gallery-indexed half first, as ``matching``), or
    ``(maxima, indices [p, g, 2hw] int32)`` with ``with_indices``: the same values and
    ordering as ``matching._maxima_and_indices_tile``, lowest location on exact ties.
  """
  if probe.ndim != 3 or probe.shape[1:] != gallery.shape[1:]:
    raise ValueError(f"expected [p, hw, d] and [g, hw, d]; got {probe.shape}, {gallery.shape}")
  return _pallas_maxima(
    probe,
    gallery,
    block=(int(block[0]), int(block[1])),
    with_indices=with_indices,
    interpret=interpret,
    precision=precision,
    backend=jax.default_backend(),
  )
