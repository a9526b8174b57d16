"""Two-stage retrieval for large galleries (docs/method.md §13).

A global descriptor (the average-pooled unit neck map, re-normalised; cosine distance) finds
each query's K nearest gallery images exactly (blockwise matmul + top-k on the devices);
QAConv re-scores only those K pairs. A query's ranked list is its shortlist ordered by the
QAConv distance, then the rest of the gallery ordered by the global distance, so CMC and
mAP stay defined over the whole gallery. `ShortlistDistance` holds such a ranking without
a dense ``[P, G]`` matrix. With K >= G every pair is re-scored and the ranking is exact.

Everything runs on the ``("data",)`` mesh of every device of every process: rows (queries,
anchors) are split over "data", each process gathering only its rows' maps, and the results
are gathered to every process, as `scoring.extract_maps` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qaconv_jax import sharding
from qaconv_jax.evaluation.metrics import sort_keys
from qaconv_jax.evaluation.rerank import order_by_value_then_index
from qaconv_jax.evaluation.scoring import Progress, _unbind
from qaconv_jax.models.model import l2_normalize

HIGHEST = jax.lax.Precision.HIGHEST
# config.eval.map_dtype: how extracted maps are stored (QAConv casts them back to its own
# compute dtype when scoring).
MAP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


class MapTable:
  """The query maps then the gallery maps as one index space ``[0, P + G)``; either may be
  a memory-mapped array (only the rows asked for are read)."""

  def __init__(self, query: np.ndarray, gallery: np.ndarray):
    if query.shape[1:] != gallery.shape[1:]:
      raise ValueError(f"query maps {query.shape} and gallery maps {gallery.shape} differ.")
    self.query, self.gallery, self.p = query, gallery, len(query)

  def __len__(self) -> int:
    return self.p + len(self.gallery)

  def take(self, idx: np.ndarray, dtype=None) -> np.ndarray:
    """``idx [...]`` -> maps ``[..., h, w, d]`` in ``dtype`` (default: as stored)."""
    flat = np.asarray(idx).reshape(-1)
    out = np.empty((len(flat), *self.query.shape[1:]), dtype or self.query.dtype)
    is_q = flat < self.p
    out[is_q] = self.query[flat[is_q]]
    out[~is_q] = self.gallery[flat[~is_q] - self.p]
    return out.reshape(*np.shape(idx), *self.query.shape[1:])


@jax.jit
def _pool(maps):
  return l2_normalize(maps.astype(jnp.float32).mean(axis=(1, 2)))  # [n, d]


def global_descriptors(maps: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """``[N, h, w, d]`` unit maps (any stored dtype, memory-mapped or not) -> ``[N, d]``
  float32: the average over locations, re-normalised to unit length."""
  if len(maps) == 0:
    return np.zeros((0, maps.shape[-1]), np.float32)
  out = [np.asarray(_pool(np.asarray(maps[lo : lo + chunk]))) for lo in range(0, len(maps), chunk)]
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _nearest_fn(mesh, k: int, far: int):
  def local(a, b):  # a: this device's rows [r, d]; b: every column [n, d]
    sim = jnp.dot(a, b.T, precision=HIGHEST)  # [r, n]
    # lax.top_k puts the lower index first among equal values: ties by column order.
    near_s, near_i = jax.lax.top_k(sim, k)
    if not far:
      return near_i, 1.0 - near_s, near_i[:, :0]
    return near_i, 1.0 - near_s, jax.lax.top_k(-sim, far)[1]

  spec = P("data")
  return jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=(spec, spec, spec))
  )


def nearest(
  rows: np.ndarray, cols: np.ndarray, k: int, far: int = 0, mesh=None, block: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact cosine nearest neighbours of unit descriptors.

  Args:
    rows: ``[R, d]``; cols: ``[C, d]`` unit float32 (every process holds both).
    k: neighbours per row (``k <= C``); far: also the ``far`` FARTHEST columns.
    block: rows per device and call.

  Returns:
    ``(index [R, k] int32, distance [R, k] float32 = 1 - cosine, far_index [R, far])``,
    nearest first, ties by column order.
  """
  mesh = mesh or sharding.make_mesh()
  if not 1 <= k <= len(cols) or far > len(cols):
    raise ValueError(f"asked for {k} nearest and {far} farthest of {len(cols)} columns.")
  devices = mesh.shape["data"]
  n = len(rows)
  step = block * devices
  fn = _nearest_fn(mesh, k, far)
  cols_d = sharding.replicate(np.asarray(cols, np.float32), mesh)
  padded = np.zeros((math.ceil(n / step) * step, rows.shape[1]), np.float32)
  padded[:n] = rows
  outs = []
  for lo in range(0, len(padded), step):
    outs.append(fn(sharding.put_global(padded[lo : lo + step], mesh, P("data")), cols_d))
  idx, dist, far_idx = (np.concatenate(x)[:n] for x in zip(*sharding.to_host(outs)))
  return idx.astype(np.int32), dist.astype(np.float32), far_idx.astype(np.int32)


def generic_lists_fn(match_fn: Callable) -> Callable:
  """A ``lists_fn`` from any cross ``match_fn(probe, gallery) -> [p, g]``: per anchor, both
  role orders of its K candidates, then the asked one. ~2x the work of a model's own
  ``match_lists`` (`eval_lib.lists_fn`); for fake models and tests."""

  def lists(anchor, cands, anchor_is_probe):  # [B, h, w, d], [B, K, h, w, d], [B, K]
    def one(x):
      a, c, aip = x
      as_probe = match_fn(a[None], c)[0]  # [K]
      as_gallery = match_fn(c, a[None])[:, 0]  # [K]
      return jnp.where(aip, as_probe, as_gallery)

    return jax.lax.map(one, (anchor, cands, anchor_is_probe))

  return lists


@functools.lru_cache(maxsize=16)
def _lists_scorer(fn: Callable, mesh, on_device: bool) -> Callable:
  """Jitted ``(bound, [maps,] anchor, cands, anchor_is_probe) -> logits``, rows split over
  "data". ``on_device``: ``anchor``/``cands`` are indices into ``maps`` (the whole table,
  replicated), gathered on each device; else they are the gathered maps."""

  def local(bound, *rest):  # this device's anchors
    args, kwargs = bound
    if on_device:
      maps, a, c, aip = rest
      rest = (maps[a], maps[c], aip)
    return fn(*args, *rest, **kwargs)

  spec = P("data")
  in_specs = (P(), P(), spec, spec, spec) if on_device else (P(), spec, spec, spec)
  # check_vma=False: as in scoring._scorer (a Pallas matcher declares no varying axes).
  return jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
  )


GATHERS = ("auto", "host", "device")


def gather_on_device(table: MapTable, mode: str = "auto", mesh=None) -> bool:
  """Where `score_lists` gathers candidate maps (``config.eval.lists_gather``).

  "host": each process gathers its rows' maps from RAM or the memory-mapped file and sends
  them (on CPU, widened to float32 on the way: XLA's CPU conversion is slower than the
  matmul). "device": the whole table goes to every device once and each device gathers
  its own rows' candidates (no per-batch transfers: what an accelerator wants). "auto":
  "device" on accelerators when the table takes at most half of a device's memory, else
  "host".
  """
  if mode not in GATHERS:
    raise ValueError(f"lists_gather={mode!r}: expected one of {GATHERS}.")
  if mode != "auto":
    return mode == "device"
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return False
  size = len(table) * math.prod(table.query.shape[1:]) * table.query.dtype.itemsize
  fits = size <= (device.memory_stats() or {}).get("bytes_limit", 0) / 2
  if jax.process_count() > 1:  # one decision for all: the processes run one program
    from jax.experimental import multihost_utils

    fits = bool(multihost_utils.broadcast_one_to_all(np.array(fits)))
  return fits


def device_table(table: MapTable, mesh=None) -> jax.Array:
  """The table's maps ``[P + G, h, w, d]`` (stored dtype) replicated on every device."""
  mesh = mesh or sharding.make_mesh()
  return sharding.replicate(np.concatenate([table.query, np.asarray(table.gallery)]), mesh)


def lists_batch(num_cands: int, map_shape: tuple, itemsize: int, budget_bytes: float) -> int:
  """Anchors per device and call whose gathered candidate maps (with their float32
  copy and one anchor's ``[K, hw, hw]`` similarities) fit ``budget_bytes``."""
  h, w, d = map_shape
  per_anchor = max(1, num_cands) * h * w * d * (itemsize + 4)
  # At most 8: larger gathers cost page faults on CPU and gained nothing measured.
  return max(1, min(8, int((budget_bytes - num_cands * (h * w) ** 2 * 4) // per_anchor)))


def score_lists(
  lists_fn: Callable,
  table: MapTable,
  anchors: np.ndarray,
  cands: np.ndarray,
  anchor_is_probe: np.ndarray,
  mesh=None,
  batch: int = 16,
  label: str = "shortlists",
  on_device: jax.Array | None = None,
) -> np.ndarray:
  """QAConv logits ``[n, K]`` float32 of each anchor against its own candidates.

  ``lists_fn(anchor [b,h,w,d], cands [b,K,h,w,d], anchor_is_probe [b,K]) -> [b, K]``
  (jitted; `eval_lib.lists_fn` or `generic_lists_fn`). ``anchors [n]``, ``cands [n, K]``
  index ``table``; ``anchor_is_probe [n, K]`` bool. ``batch``: anchors per device and call.
  Each process gathers the maps of its rows only; every process gets the whole result.
  ``on_device``: the table's maps ``[P + G, h, w, d]`` already replicated on every device
  (`device_table`): each device then gathers its rows' candidates itself.
  """
  mesh = mesh or sharding.make_mesh()
  n, k = cands.shape
  if n == 0:
    return np.zeros((0, k), np.float32)
  global_batch = batch * mesh.shape["data"]
  rows = sharding.local_rows(global_batch, mesh)
  fn, bound = _unbind(lists_fn)
  bound = sharding.replicate(bound, mesh)
  num_batches = math.ceil(n / global_batch)
  # XLA on CPU widens float16 / bfloat16 operands ~2x slower than the matmul itself runs;
  # there the host widens them while it gathers. Accelerators receive the stored dtype.
  wide = np.float32 if jax.default_backend() == "cpu" else None
  if on_device is not None:
    score = functools.partial(_lists_scorer(fn, mesh, True), bound, on_device)
    gather = lambda a, c: (a, c)
  else:
    score = functools.partial(_lists_scorer(fn, mesh, False), bound)
    gather = lambda a, c: (table.take(a, wide), table.take(c, wide))
  bar = Progress(label, num_batches)
  out, pending = [], None
  for b in range(num_batches):
    pos = np.minimum(b * global_batch + rows, n - 1)  # padding rows repeat the last one
    args = (*gather(anchors[pos], cands[pos]), anchor_is_probe[pos])
    logits = score(*(sharding.rows_to_global(x, rows, global_batch, mesh) for x in args))
    if pending is not None:  # gathered one batch behind: the next gather overlaps the devices
      out.append(sharding.to_host(pending))
      bar.update()
    pending = logits
  out.append(sharding.to_host(pending))
  bar.update()
  return np.concatenate(out)[:n].astype(np.float32)


def lists_scorer(
  lists_fn: Callable, table: MapTable, budget_bytes: float, gather: str = "auto", mesh=None
) -> Callable:
  """``score(anchors [n], cands [n, L], anchor_is_probe [n, L], label) -> logits [n, L]``:
  `score_lists` over ``table`` in batches that fit ``budget_bytes`` per device, the table
  put on the devices once when ``gather`` (``config.eval.lists_gather``) says so."""
  on_device = device_table(table, mesh) if gather_on_device(table, gather, mesh) else None
  itemsize = np.dtype(table.query.dtype).itemsize

  def score(anchors, cands, anchor_is_probe, label):
    batch = lists_batch(cands.shape[1], table.query.shape[1:], itemsize, budget_bytes)
    return score_lists(
      lists_fn, table, anchors, cands, anchor_is_probe, mesh, batch, label, on_device
    )

  return score


class ShortlistDistance:
  """A ``[P, G]`` ranking known on each query's shortlist (docs/method.md §13): the
  shortlist ``index [P, K]`` ordered by ``values [P, K]`` (a distance; ties by gallery
  index), then every other gallery item ordered by the global cosine distance of
  ``query_desc [P, d]`` and ``gallery_desc [G, d]`` (ties by gallery index).

  `metrics.evaluate_ranking` and `testset.top_k_lists` take it where they take a dense
  distance; ``sort_keys(rows)`` is its part of the ranking.
  """

  def __init__(self, index, values, query_desc, gallery_desc):
    self.index = np.asarray(index, np.int64)
    self.values = np.asarray(values, np.float32)
    self.query_desc, self.gallery_desc = query_desc, gallery_desc
    self.shape = (len(query_desc), len(gallery_desc))
    if self.index.shape != self.values.shape or len(self.index) != self.shape[0]:
      raise ValueError(
        f"shortlist index {self.index.shape} and values {self.values.shape} must both be "
        f"[P, K] with P = {self.shape[0]}."
      )

  def with_values(self, values) -> ShortlistDistance:
    """The same shortlists ranked by other values (a post-processed distance)."""
    return ShortlistDistance(self.index, values, self.query_desc, self.gallery_desc)

  def ordered(self, rows=slice(None)) -> np.ndarray:
    """``[r, K]`` the shortlists of ``rows``, best first."""
    return order_by_value_then_index(self.values[rows], self.index[rows])

  def sort_keys(self, rows: np.ndarray) -> np.ndarray:
    """``[len(rows), G]`` uint64 whose plain sort is this ranking: shortlist positions
    ``pos << 32 | index`` (< 2^63) before the rest's `metrics.sort_keys` of the global
    distance (>= 2^63: a non-negative float's order bits have the top bit set)."""
    cos = self.query_desc[rows] @ self.gallery_desc.T  # [r, G]
    keys = sort_keys(np.maximum(1.0 - cos, 0.0))
    best = self.ordered(rows)  # [r, K]
    pos = np.arange(best.shape[1], dtype=np.uint64)[None, :]
    keys[np.arange(len(best))[:, None], best] = (pos << np.uint64(32)) | best.astype(np.uint64)
    return keys

  def dense(self) -> np.ndarray:
    """``[P, G]`` distances, only when every query's shortlist is the whole gallery."""
    if self.index.shape[1] < self.shape[1]:
      raise ValueError("shortlists shorter than the gallery have no dense distance.")
    out = np.empty(self.shape, np.float32)
    np.put_along_axis(out, self.index, self.values, axis=1)
    return out
