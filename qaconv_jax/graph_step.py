"""The graph sampler's step at the start of every epoch (docs/method.md §12): one random
image per training class, embedded by the current model in inference mode, the class-to-class
QAConv distance on every device (the evaluation scorer), and the epoch's batches from it
(`qaconv_jax.data.graph_sampler.graph_batches`, pure and deterministic in its seed).

Every process of a multi-process run computes the same distance (the scorer gathers it) and
so the same batches; each then reads its own slice of every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from qaconv_jax.data.graph_sampler import graph_batches, pick_representatives
from qaconv_jax.data.pipeline import check_pk
from qaconv_jax.data.splits import Subset
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance


class EpochGraph(NamedTuple):
  batches: np.ndarray  # [num_classes, batch_size] int32 dataset indices, one batch per class
  embed_seconds: float
  distance_seconds: float
  batch_seconds: float

  @property
  def seconds(self) -> float:
    return self.embed_seconds + self.distance_seconds + self.batch_seconds


def epoch_graph(
  embed_fn: Callable,
  match_fn: Callable,
  source,
  class_images: list[np.ndarray],
  data_cfg,
  eval_cfg,
  seed: int,
  epoch: int,
  mesh=None,
) -> EpochGraph:
  """The batches of ``epoch`` (0-based) from the model behind ``embed_fn``/``match_fn``
  (jitted, inference mode: `qaconv_jax.evaluation.eval_lib.model_fns`).

  ``class_images``: dataset indices of each class (`graph_sampler.class_image_lists`);
  ``data_cfg``: ``config.data`` (image_size, batch_size, pk_k = K); ``eval_cfg``:
  ``config.eval`` (batch_size and memory_budget_gb of the scorer). Randomness comes from
  ``(seed, epoch)`` only, so a resumed run draws the graph a straight run would.
  """
  check_pk(data_cfg)
  start = time.perf_counter()
  picked = pick_representatives(class_images, (seed, epoch, 3))  # [C] dataset indices
  maps = extract_maps(
    embed_fn,
    Subset(source, picked, relabel=False),
    tuple(data_cfg.image_size),
    eval_cfg.batch_size,
    label=f"epoch {epoch + 1} graph: features",
    mesh=mesh,
  )  # [C, h, w, d]
  embedded = time.perf_counter()
  _, logits = pairwise_distance(
    match_fn,
    maps,
    maps,
    budget_bytes=eval_cfg.memory_budget_gb * 2**30,
    label=f"epoch {epoch + 1} graph: class distances",
    return_logits=True,
    mesh=mesh,
  )  # [C, C]
  # -logit ranks as 1 - sigmoid(logit / 10) does but never saturates into ties (the
  # authors' HEAD uses it here too).
  dist = -logits
  scored = time.perf_counter()
  batches = graph_batches(
    dist, class_images, data_cfg.batch_size // data_cfg.pk_k, data_cfg.pk_k, (seed, epoch, 4)
  )
  done = time.perf_counter()
  return EpochGraph(
    np.asarray(batches, np.int32), embedded - start, scored - embedded, done - scored
  )
