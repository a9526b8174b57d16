"""Feature extraction and memory-bounded QAConv scoring on every device (docs/method.md §2,
evaluation).

Both run on the ``("data",)`` mesh of every device of every process. Extraction splits each
fixed-shape global batch over "data" (each process loads only its rows) and gathers the maps
to every process in source order. Scoring puts the gallery maps on the mesh once, split over
"data"; each probe block is replicated and one jitted call scores it against the whole
gallery, every device looping over ``[bp, bg]`` blocks of its gallery part whose working set
stays under a memory budget. Edge blocks are padded to the same shape, so all blocks share one
compilation; eval-mode BN is elementwise per pair, so blocks and devices never change the
numbers. Results stay on the devices until one transfer at the end.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qaconv_jax import sharding
from qaconv_jax.data.pipeline import eval_image, iterate
from qaconv_jax.models.qaconv import check_eval_distance, logit_distance


class Progress:
  """A one-line progress bar with ETA on stderr (process 0 only)."""

  def __init__(self, label: str, total: int, stream=sys.stderr):
    self.label, self.total = label, max(1, total)
    self.stream = stream if jax.process_index() == 0 else None
    self.start, self.done = time.perf_counter(), 0

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.stream is None:
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    width = 30
    filled = int(width * self.done / self.total)
    self.stream.write(
      f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] "
      f"{self.done}/{self.total}  {elapsed:5.1f}s  ETA {eta:5.1f}s"
    )
    if self.done >= self.total:
      self.stream.write("\n")
    self.stream.flush()


def _unbind(fn: Callable):
  """``(f, bound)`` with ``fn(*a) == f(*bound[0], *a, **bound[1])``. A ``functools.partial``
  binding only arrays (`eval_lib.model_fns`: the variables) is opened, so the variables
  become arguments: on the mesh once, and one compilation for every set of them."""
  if isinstance(fn, functools.partial):
    leaves = jax.tree.leaves((fn.args, fn.keywords))
    if all(isinstance(x, jax.Array | np.ndarray) for x in leaves):
      return fn.func, (fn.args, dict(fn.keywords))
  return fn, ((), {})


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  """``x`` with zero rows appended up to a multiple of ``n`` rows."""
  return np.concatenate([x, np.zeros(((n - len(x) % n) % n, *x.shape[1:]), x.dtype)])


def _local_batches(source, image_size, rows, global_batch: int, num_batches: int, image=None):
  """This process's rows ``[len(rows), H, W, 3]`` float32 of every global batch (global
  position ``b * global_batch + row``; positions past the source are zero images).
  ``image(i)``: image ``i`` as float32 ``[H, W, 3]`` in [0, 1] (default: `eval_image`)."""
  n = len(source)
  positions = (np.arange(num_batches)[:, None] * global_batch + rows[None]).reshape(-1)
  image = image or (lambda i: eval_image(source, i, image_size).astype(np.float32) / 255.0)

  def load(i):
    if i >= n:
      return np.zeros((*image_size, 3), np.float32)
    return image(i)

  ds = grain.MapDataset.source(positions).map(load).batch(len(rows), batch_fn=np.stack)
  return iterate(ds)


def extract_maps(
  embed_fn: Callable,
  source,
  image_size: tuple[int, int],
  batch_size: int,
  label: str = "features",
  mesh=None,
  dtype=None,
  out: np.ndarray | None = None,
  image: Callable[[int], np.ndarray] | None = None,
  progress: Progress | None = None,
) -> np.ndarray:
  """``[N, h, w, d]`` maps of every image of ``source`` in source order, on every process.

  ``embed_fn(images [B, H, W, 3]) -> [B, h, w, d]`` should be jitted. Each global batch
  (``batch_size`` rounded up to a multiple of the device count) is split over "data" of
  ``mesh`` (None: `sharding.make_mesh`); every call has the same shape (the last batch is
  padded and its padding dropped). ``dtype``: the stored maps' dtype (float16 / bfloat16
  halve the memory; default as computed); ``out``: an ``[N, h, w, d]`` array (e.g. a
  memory-mapped file) to write into batch by batch and return, instead of a new array.
  ``image(i)``: how image ``i`` is loaded (float32 ``[H, W, 3]`` in [0, 1]; default: decoded
  and resized as evaluation does); ``progress``: a bar (counting images) to advance instead
  of a new one.
  """
  mesh = mesh or sharding.make_mesh()
  devices = mesh.shape["data"]
  global_batch = math.ceil(batch_size / devices) * devices
  num_batches = math.ceil(len(source) / global_batch)
  rows = sharding.local_rows(global_batch, mesh)
  fn, (args, kwargs) = _unbind(embed_fn)
  args, kwargs = sharding.replicate((args, kwargs), mesh)
  parts, pending = [], None
  bar = progress or Progress(label, len(source))

  def keep(maps: jax.Array, b: int) -> None:
    host = sharding.to_host(maps)[: len(source) - b * global_batch]
    host = host if dtype is None else host.astype(dtype)
    if out is None:
      parts.append(host)
    else:
      out[b * global_batch : b * global_batch + len(host)] = host
    bar.update(len(host))

  batches = _local_batches(source, image_size, rows, global_batch, num_batches, image)
  for b, local in enumerate(batches):
    images = sharding.rows_to_global(local, rows, global_batch, mesh)
    maps = fn(*args, images, **kwargs)
    if pending is not None:  # gathered one batch behind, so the devices never wait for it
      keep(pending, b - 1)
    pending = maps
  keep(pending, num_batches - 1)
  return out if out is not None else np.concatenate(parts)


def block_shape(num_probe: int, num_gallery: int, hw: int, budget_bytes: float) -> tuple[int, int]:
  """``(bp, bg)`` whose per-block working set (on one device) fits ``budget_bytes``.

  Per pair the block holds the ``2hw`` maxima, their BN output and the head's
  intermediates (~4 float32 ``[2hw]`` vectors); the input maps are small beside them.
  """
  per_pair = 4 * 2 * hw * 4
  pairs = max(1, int(budget_bytes // per_pair))
  bp = min(num_probe, max(1, int(math.sqrt(pairs))))
  bg = min(num_gallery, max(1, pairs // bp))
  return bp, bg


@functools.lru_cache(maxsize=8)
def _scorer(fn: Callable, mesh, num_blocks: int, with_logits: bool, distance: str) -> Callable:
  """Jitted ``(bound, probe [bp, ...] replicated, gallery [G', ...] split over "data") ->
  distance (, logits) [bp, G']`` split over "data" on the gallery axis (``distance``: the
  kind of `logit_distance`)."""

  def local(bound, probe, gallery):  # gallery: this device's [num_blocks * bg, h, w, d]
    args, kwargs = bound
    blocks = gallery.reshape(num_blocks, -1, *gallery.shape[1:])
    logits = jax.lax.map(lambda g: fn(*args, probe, g, **kwargs), blocks)  # [nb, bp, bg]
    return jnp.moveaxis(logits, 0, 1).reshape(probe.shape[0], -1)

  # check_vma=False: a pallas_call (match_impl="pallas") declares no varying-axis types.
  on_mesh = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P(None, "data"), check_vma=False
  )

  def score(bound, probe, gallery):
    logits = on_mesh(bound, probe, gallery)
    dist = logit_distance(logits, distance)
    return (dist, logits) if with_logits else dist

  return jax.jit(score)


def pairwise_distance(
  match_fn: Callable,
  probe: np.ndarray,
  gallery: np.ndarray,
  budget_bytes: float = 2 * 2**30,
  block: tuple[int, int] | None = None,
  label: str = "scores",
  return_logits: bool = False,
  mesh=None,
  distance: str = "sigmoid",
):
  """QAConv distance ``[P, G]`` on every device of ``mesh`` (None: `sharding.make_mesh`);
  with ``return_logits``: ``(distance, logits)``, both ``[P, G]`` float32. Every process
  passes and gets the whole arrays. ``distance`` (``config.eval.distance``): ``"sigmoid"``
  = ``1 - sigmoid(logit / 10)``, ``"neg_logit"`` = ``-logit`` (`logit_distance`).

  ``match_fn(probe [bp, h, w, d], gallery [bg, h, w, d]) -> logits [bp, bg]`` (jitted).
  ``block``: at most ``(bp, bg)`` per device and call (default: `block_shape` of
  ``budget_bytes``). Each device also holds ``[P, G / devices]`` of the results until the
  end, when they are gathered (multi-process: the whole ``[P, G]`` on every device then).
  """
  check_eval_distance(distance)
  mesh = mesh or sharding.make_mesh()
  devices = mesh.shape["data"]
  p, g = len(probe), len(gallery)
  if not p or not g:
    empty = np.zeros((p, g), np.float32)
    return (empty, empty.copy()) if return_logits else empty
  hw = probe.shape[1] * probe.shape[2]
  bp, bg = block or block_shape(p, g, hw, budget_bytes)
  # Equal gallery parts per device, each in equal blocks of at most bg.
  part = math.ceil(g / devices)
  num_blocks = math.ceil(part / bg)
  bg = math.ceil(part / num_blocks)
  gallery_d = sharding.put_global(_pad(gallery, devices * num_blocks * bg), mesh, P("data"))
  fn, bound = _unbind(match_fn)
  bound = sharding.replicate(bound, mesh)
  score = _scorer(fn, mesh, num_blocks, return_logits, distance)
  probe_p = _pad(probe, bp)
  outs = []
  bar = Progress(label, len(probe_p) // bp)
  for i in range(0, len(probe_p), bp):
    outs.append(score(bound, sharding.put_global(probe_p[i : i + bp], mesh, P()), gallery_d))
    if len(outs) > 1:  # the bar follows the devices, one block behind the dispatch
      jax.block_until_ready(outs[-2])
      bar.update()
  jax.block_until_ready(outs[-1])
  bar.update()
  whole = sharding.to_host(_concat(outs))
  dist, logits = whole if return_logits else (whole, None)
  dist = dist[:p, :g]
  return (dist, logits[:p, :g]) if return_logits else dist


@jax.jit
def _concat(blocks):
  """Probe blocks (tuples of) ``[bp, G']`` -> ``[P', G']``, on the devices."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)
