"""Graph sampling (Liao & Shao, "Graph Sampling Based Deep Metric Learning for Generalizable
Person Re-Identification", CVPR 2022; QAConv 2.1, official reid/utils/data/graph_sampler.py at
github ShengcaiLiao/QAConv).

Once per epoch the sampler picks one image of every class (`pick_representatives`), matches
them all against each other with the current model, and builds one batch around every class:
the class itself and its ``classes_per_batch - 1`` nearest other classes, ``k`` images of each
(`graph_batches`). Batches of mutually confusable identities make the batch-hard triplet loss
(`qaconv_jax.losses.triplet_loss`) informative. This module only turns a class-to-class
distance into batches; the training loop computes ``dist`` from the current model each epoch.

One deliberate difference from the official sampler: there, each class's shuffled image list
and its read pointer persist from one epoch to the next. Here they are rebuilt at every call
from the epoch's seed, so an epoch's batches are a pure function of ``(dist, seed)`` and a run
resumed from a checkpoint draws exactly the batches the uninterrupted run would have. Within
an epoch the pointer semantics are the official ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qaconv_jax.errors import ConfigError, DataError


def class_image_lists(pids: np.ndarray) -> list[np.ndarray]:
  """Dataset indices of every class ``0..C-1``, ``C = max(pids) + 1``, from the per-image
  class ids ``pids [n]``; each list is in dataset order (int64). Raises `DataError` if some
  class in ``0..C-1`` has no image or an id is negative / not an integer."""
  pids = np.asarray(pids)
  if pids.ndim != 1 or pids.size == 0 or not np.issubdtype(pids.dtype, np.integer):
    raise DataError(
      f"class ids must be a non-empty 1-D integer array; got {pids.dtype} {pids.shape}."
    )
  if pids.min() < 0:
    raise DataError(f"class ids must be >= 0; got {int(pids.min())}.")
  counts = np.bincount(pids)
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    raise DataError(
      f"class ids must be contiguous 0..{len(counts) - 1}: {missing.size} classes have no "
      f"image (first: {missing[:5].tolist()})."
    )
  order = np.argsort(pids, kind="stable")
  return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])


def pick_representatives(
  class_images: Sequence[Sequence[int]], seed: int | Sequence[int]
) -> np.ndarray:
  """One image index per class, uniformly at random (the images the epoch's ``dist`` is
  computed from, as the official picks them): ``[C]`` int64, deterministic in ``seed``."""
  _check_classes(class_images)
  sizes = np.array([len(images) for images in class_images])
  picks = np.random.default_rng(seed).integers(0, sizes)
  return np.array([class_images[c][p] for c, p in enumerate(picks.tolist())], np.int64)


def graph_batches(
  dist: np.ndarray,
  class_images: Sequence[Sequence[int]],
  classes_per_batch: int,
  k: int,
  seed: int | Sequence[int],
) -> list[list[int]]:
  """One epoch of graph-sampled batches.

  Args:
    dist: ``[C, C]`` class-to-class distances (smaller = nearer); the diagonal is ignored.
    class_images: per class ``0..C-1``, its dataset indices.
    classes_per_batch: classes in a batch (``batch_size // k``), 2..C.
    k: images of each class in a batch.
    seed: int or sequence of ints for `np.random.default_rng`; the batches are a pure
      function of ``(dist, class_images, classes_per_batch, k, seed)``.

  Returns:
    ``C`` batches of ``classes_per_batch * k`` dataset indices, in shuffled order. The batch
    anchored at class ``i`` holds the ``classes_per_batch - 1`` classes nearest to ``i``
    (nearest first, ties to the lower class id) and then ``i`` itself, ``k`` consecutive
    images each. Each class's images are read from a list shuffled at the start, through a
    pointer shared by all batches; once the list is used up (also when a read ends exactly
    at its end) it is reshuffled and the pointer restarts, so a class with fewer than ``k``
    images repeats some, and one with more gives all before repeating any.
  """
  num_classes = _check_classes(class_images)
  dist = np.asarray(dist)
  if dist.shape != (num_classes, num_classes):
    raise DataError(
      f"dist must be [C, C] with C = {num_classes} classes (len(class_images)); got {dist.shape}."
    )
  if classes_per_batch < 2:
    raise ConfigError(
      f"classes_per_batch={classes_per_batch}: a graph-sampled batch needs at least 2 classes "
      "(the triplet loss needs negatives); lower k or raise the batch size."
    )
  if classes_per_batch > num_classes:
    raise DataError(
      f"classes_per_batch={classes_per_batch} distinct classes per batch, but the data has "
      f"only {num_classes} classes."
    )
  if k < 1:
    raise ConfigError(f"k={k}: each class needs at least 1 image per batch.")
  off_diagonal = ~np.eye(num_classes, dtype=bool)
  bad = int(np.sum(~np.isfinite(dist) & off_diagonal))
  if bad:
    raise DataError(
      f"dist has {bad} non-finite entries off the diagonal; neighbours chosen from them "
      "would be arbitrary (a diverged model?)."
    )
  neighbours = _nearest_others(dist, classes_per_batch - 1)  # [C, classes_per_batch - 1]
  members = np.concatenate([neighbours, np.arange(num_classes)[:, None]], axis=1).tolist()

  rng = np.random.default_rng(seed)
  lists = [[int(x) for x in rng.permutation(np.asarray(images))] for images in class_images]
  pointers = [0] * num_classes
  batches = []
  for classes in members:
    batch = []
    for c in classes:
      images, start = lists[c], pointers[c]
      end = start + k
      if end < len(images):  # the common case: no wrap-around
        batch.extend(images[start:end])
        pointers[c] = end
        continue
      # The official while loop: take what is left, reshuffle when the end is reached, go on.
      remain = k
      while remain > 0:
        end = start + remain
        taken = images[start:end]
        batch.extend(taken)
        remain -= len(taken)
        start = end
        if end >= len(images):
          rng.shuffle(images)
          start = 0
      pointers[c] = start
    batches.append(batch)
  return [batches[i] for i in rng.permutation(num_classes).tolist()]


def _check_classes(class_images: Sequence[Sequence[int]]) -> int:
  """The number of classes; raises `DataError` on none or on a class without images."""
  if len(class_images) == 0:
    raise DataError("class_images is empty: graph sampling needs classes.")
  empty = [c for c, images in enumerate(class_images) if len(images) == 0]
  if empty:
    raise DataError(f"{len(empty)} classes have no image (first: {empty[:5]}).")
  return len(class_images)


def _nearest_others(dist: np.ndarray, m: int) -> np.ndarray:
  """``[C, C] -> [C, m]`` int64: per row the ``m`` nearest other columns, nearest first, ties
  to the lower index (a stable sort of the row without itself)."""
  d = np.array(dist, np.float64)
  np.fill_diagonal(d, np.inf)  # the official adds 1e15 to exclude the anchor itself
  # A full stable sort of every row is the slow part at thousands of classes: partition to
  # the m-th smallest value, keep everything below it and the lowest-index ties at it.
  kth = np.take_along_axis(d, np.argpartition(d, m - 1, axis=1)[:, m - 1 : m], axis=1)
  below = d < kth
  at = d == kth
  need = m - below.sum(axis=1, keepdims=True)
  chosen = below | (at & (np.cumsum(at, axis=1) <= need))
  cols = np.nonzero(chosen)[1].reshape(len(d), m)  # ascending column within each row
  order = np.argsort(np.take_along_axis(d, cols, axis=1), axis=1, kind="stable")
  return np.take_along_axis(cols, order, axis=1)
