"""Feature extraction and memory-bounded QAConv scoring (docs/method.md §2, evaluation).

Maps are extracted in fixed-shape padded batches (one compilation). Distances are computed
in ``[bp, bg]`` blocks whose working set stays under a memory budget; edge blocks are
padded to the same shape, so all blocks share one compilation. Eval-mode BN is
elementwise, so block sizes never change the numbers.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from qaconv_jax.data.pipeline import eval_batches
from qaconv_jax.models.qaconv import qaconv_distance


class Progress:
  """A one-line progress bar with ETA on stderr (quiet when ``total`` is tiny)."""

  def __init__(self, label: str, total: int, stream=sys.stderr):
    self.label, self.total, self.stream = label, max(1, total), stream
    self.start, self.done = time.perf_counter(), 0

  def update(self, n: int = 1) -> None:
    self.done += n
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


def extract_maps(
  embed_fn: Callable, source, image_size: tuple[int, int], batch_size: int, label: str = "features"
) -> np.ndarray:
  """``[N, h, w, d]`` float32 maps of every image of ``source`` (in source order).

  ``embed_fn(images [B, H, W, 3]) -> [B, h, w, d]`` should be jitted; every call has the
  same shape (the last batch is padded and its padding dropped).
  """
  out = []
  bar = Progress(label, math.ceil(len(source) / batch_size))
  for batch in eval_batches(source, image_size, batch_size):
    maps = np.asarray(embed_fn(jnp.asarray(batch["image"])))
    out.append(maps[batch["mask"]])
    bar.update()
  return np.concatenate(out)


def block_shape(num_probe: int, num_gallery: int, hw: int, budget_bytes: float) -> tuple[int, int]:
  """``(bp, bg)`` whose per-block working set fits ``budget_bytes``.

  Per pair the block holds the ``2hw`` maxima, their BN output and the head's
  intermediates (~4 float32 ``[2hw]`` vectors); the input maps are small beside them.
  """
  per_pair = 4 * 2 * hw * 4
  pairs = max(1, int(budget_bytes // per_pair))
  bp = min(num_probe, max(1, int(math.sqrt(pairs))))
  bg = min(num_gallery, max(1, pairs // bp))
  return bp, bg


def pairwise_distance(
  match_fn: Callable,
  probe: np.ndarray,
  gallery: np.ndarray,
  budget_bytes: float = 2 * 2**30,
  block: tuple[int, int] | None = None,
  label: str = "scores",
  return_logits: bool = False,
):
  """QAConv distance ``[P, G]`` = ``1 - sigmoid(logit / 10)``, block by block (with
  ``return_logits``: ``(distance, logits)``, both ``[P, G]`` float32).

  ``match_fn(probe [bp, h, w, d], gallery [bg, h, w, d]) -> logits [bp, bg]`` (jitted).
  """
  p, g = len(probe), len(gallery)
  hw = probe.shape[1] * probe.shape[2]
  bp, bg = block or block_shape(p, g, hw, budget_bytes)

  def pad(x, n):  # to a multiple of n rows, so every block has one shape
    return np.concatenate([x, np.zeros(((n - len(x) % n) % n, *x.shape[1:]), x.dtype)])

  probe_p, gallery_p = pad(probe, bp), pad(gallery, bg)
  out = np.empty((p, g), np.float32)
  out_logits = np.empty((p, g), np.float32) if return_logits else None
  bar = Progress(label, (len(probe_p) // bp) * (len(gallery_p) // bg))
  for i in range(0, len(probe_p), bp):
    pi = jnp.asarray(probe_p[i : i + bp])
    for j in range(0, len(gallery_p), bg):
      logits = match_fn(pi, jnp.asarray(gallery_p[j : j + bg]))
      rows, cols = min(bp, p - i), min(bg, g - j)
      out[i : i + bp, j : j + bg] = np.asarray(qaconv_distance(logits))[:rows, :cols]
      if return_logits:
        out_logits[i : i + bp, j : j + bg] = np.asarray(logits)[:rows, :cols]
      bar.update()
  return (out, out_logits) if return_logits else out
