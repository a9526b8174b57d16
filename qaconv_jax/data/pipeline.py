"""grain input pipeline: sources, deterministic sample orders, train and eval batches.

A training stream is ``order -> host slice -> load + augment -> batch``:
- the order (shuffled epochs, or identity-balanced P x K) is a lazy sequence of dataset
  indices that depends only on ``(seed, epoch)``; consecutive ``global_batch`` entries form
  one global batch;
- each host reads only its slice of every global batch (``host``, ``num_hosts``);
- augmentation randomness is drawn from ``(seed, global position)``, so a batch is the same
  whatever the number of hosts. Batch n of the dataset is global batch n on every host
  count, so ``train_dataset(...)[n:]`` resumes exactly after n steps, on any host count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from qaconv_jax.data.augment import augment, decode
from qaconv_jax.data.datasets import CombinedSource, check_combine_all, load_dataset
from qaconv_jax.errors import ConfigError, DataError, MissingFile


class FolderSource:
  """Random access to ``Record``s of a raw dataset folder (images read as bytes)."""

  def __init__(self, records: Sequence[Any]):
    self.records = list(records)
    self.pids = np.array([r.pid for r in self.records], np.int64)
    self.cameras = np.array([r.camera for r in self.records], np.int64)
    self.times = np.array([r.time for r in self.records], np.float64)
    self.names = [r.path for r in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    r = self.records[i]
    try:
      with open(r.path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise MissingFile(f"cannot read image {r.path}: {e}") from None
    return {"image": data, "pid": r.pid, "camera": r.camera, "time": r.time, "where": r.path}


def open_source(cfg, split: str):
  """``config.data`` -> the ``split`` ("train", "query" or "gallery") as a random-access source:
  a prepared TFDS dataset when ``cfg.tfds_dir`` is set, else the raw folder ``cfg.root``.

  With ``cfg.combine_all`` (MSMT17 only) "train" is train + query + gallery, the test ids
  relabelled after the training ones (`CombinedSource`); query and gallery are unchanged.
  """
  combine = split == "train" and bool(cfg.get("combine_all"))
  check_combine_all(cfg.dataset, combine)
  if cfg.tfds_dir:
    from qaconv_jax.data.tfds_builders import TfdsSource  # tfds only when asked for

    def one(s):
      return TfdsSource(cfg.dataset, s, cfg.tfds_dir)
  elif cfg.root:
    ds = load_dataset(cfg.dataset, cfg.root)

    def one(s):
      return FolderSource(getattr(ds, s))
  else:
    raise ConfigError(
      "no data: set config.data.root (the dataset's folder) or "
      "config.data.tfds_dir (prepared with python -m qaconv_jax.data.prepare)."
    )
  return CombinedSource(one("train"), one("query"), one("gallery")) if combine else one(split)


def materialize_synthetic(cfg, data_root: str, write: bool = True, timeout: float = 600.0):
  """A source config with ``synthetic_domain`` and no root/tfds_dir -> the same config with
  ``root`` set to a synthetic tree under ``data_root``, written on first use; with
  ``write=False`` (the other hosts of a multi-host run) it waits for the writer instead."""
  if not cfg.get("synthetic_domain") or cfg.root or cfg.tfds_dir:
    return cfg
  root = os.path.join(data_root, f"synthetic_{cfg.synthetic_domain}_{cfg.synthetic_ids}")
  done = os.path.join(root, ".complete")
  if write and not os.path.exists(done):
    from qaconv_jax.data.synthetic import write_market_tree

    write_market_tree(root, cfg.synthetic_domain, cfg.synthetic_ids, seed=0)
    open(done, "w").close()
  start = time.time()
  while not os.path.exists(done):
    if time.time() - start > timeout:
      raise TimeoutError(f"waited {timeout:.0f}s for {done} (written by process 0).")
    time.sleep(0.5)
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.root = root
  return cfg


class EpochOrder:
  """Every index once per epoch in a fresh permutation of ``(seed, epoch)``; the tail that
  does not fill a global batch is dropped."""

  def __init__(self, num_items: int, global_batch: int, num_epochs: int, seed: int):
    if num_items < global_batch:
      raise DataError(f"{num_items} images cannot fill one batch of {global_batch}.")
    self.n, self.epoch_len = num_items, (num_items // global_batch) * global_batch
    self.num_epochs, self.seed = num_epochs, seed
    self._cache: tuple[int, np.ndarray] | None = None

  def epoch(self, e: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != e:
      self._cache = (e, np.random.default_rng([self.seed, e]).permutation(self.n)[: self.epoch_len])
    return self._cache[1]

  def __len__(self) -> int:
    return self.epoch_len * self.num_epochs

  def __getitem__(self, i: int) -> int:
    return int(self.epoch(i // self.epoch_len)[i % self.epoch_len])


class PKOrder(EpochOrder):
  """Identity-balanced batches: P identities x K images each. Per epoch every identity is
  drawn once (in a permutation of ``(seed, epoch)``), with K of its images (without
  replacement when it has K, else with); identities that do not fill P are dropped."""

  def __init__(self, pids: np.ndarray, p: int, k: int, num_epochs: int, seed: int):
    self.by_id = [np.flatnonzero(pids == pid) for pid in np.unique(pids)]
    if len(self.by_id) < p:
      raise DataError(f"P x K sampling needs at least P={p} identities, found {len(self.by_id)}.")
    self.p, self.k = p, k
    self.epoch_len = (len(self.by_id) // p) * p * k
    self.num_epochs, self.seed = num_epochs, seed
    self._cache = None

  def epoch(self, e: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != e:
      rng = np.random.default_rng([self.seed, e, 1])
      ids = rng.permutation(len(self.by_id))[: self.epoch_len // self.k]
      order = [rng.choice(self.by_id[i], self.k, replace=len(self.by_id[i]) < self.k) for i in ids]
      self._cache = (e, np.concatenate(order))
    return self._cache[1]


class HostSlice:
  """``(global position, dataset index)`` of this host's share of every global batch."""

  def __init__(self, order: EpochOrder, global_batch: int, host: int, num_hosts: int):
    if global_batch % num_hosts:
      raise ConfigError(f"global batch {global_batch} must divide over {num_hosts} hosts.")
    self.order, self.global_batch, self.local = order, global_batch, global_batch // num_hosts
    self.host = host

  def __len__(self) -> int:
    return len(self.order) // self.global_batch * self.local

  def __getitem__(self, i: int) -> tuple[int, int]:
    pos = (i // self.local) * self.global_batch + self.host * self.local + i % self.local
    return pos, int(self.order[pos])


def _stack(elements: Sequence[dict]) -> dict:
  return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def _loader(source, cfg, seed: int, first_position: int = 0):
  """``(position, dataset index) -> example``: decoded and augmented with randomness drawn
  from ``(seed, global position)``, ``first_position`` + the position in the order."""
  size = tuple(cfg.image_size)

  def load(item):
    pos, idx = item
    ex = source[idx]
    rng = np.random.default_rng([seed, first_position + pos, 2])
    img = augment(decode(ex["image"], ex["where"]), size, cfg.augment, rng)
    return {
      "image": img.astype(np.float32) / 255.0,
      "label": np.int32(ex["pid"]),
      "camera": np.int32(ex["camera"]),
    }

  return load


def _batched(order, source, cfg, seed: int, host: int, num_hosts: int, first_position: int = 0):
  local = cfg.batch_size // num_hosts
  return (
    grain.MapDataset.source(HostSlice(order, cfg.batch_size, host, num_hosts))
    .map(_loader(source, cfg, seed, first_position))
    .batch(local, drop_remainder=True, batch_fn=_stack)
  )


def train_dataset(
  source, cfg, *, seed: int, num_epochs: int, host: int = 0, num_hosts: int = 1
) -> grain.MapDataset:
  """Batches ``{"image": [b, H, W, 3] float32 in [0, 1], "label": [b] int32, "camera"}``.

  ``cfg`` is ``config.data``: ``image_size``, ``batch_size`` (global), ``sampler``
  ("shuffle" or "pk"; "graph" epochs come from `graph_epoch_dataset`), ``pk_k`` (K; P =
  batch_size / K), ``augment``.
  """
  if cfg.sampler == "pk":
    check_pk(cfg)
    order = PKOrder(source.pids, cfg.batch_size // cfg.pk_k, cfg.pk_k, num_epochs, seed)
  elif cfg.sampler == "shuffle":
    order = EpochOrder(len(source), cfg.batch_size, num_epochs, seed)
  else:
    raise ConfigError(
      f"train_dataset reads data.sampler 'shuffle' or 'pk', got {cfg.sampler!r} (the graph "
      "sampler's epochs: graph_epoch_dataset)."
    )
  return _batched(order, source, cfg, seed, host, num_hosts)


def graph_epoch_dataset(
  source, cfg, batches: np.ndarray, *, seed: int, first_step: int, host: int = 0, num_hosts: int = 1
) -> grain.MapDataset:
  """One graph-sampler epoch as `train_dataset` batches: ``batches [steps, batch_size]``
  dataset indices (`qaconv_jax.data.graph_sampler.graph_batches`), the epoch starting after
  global step ``first_step`` (augmentation randomness follows the global position, so the
  n-th batch of the run is augmented alike however the run was interrupted)."""
  batches = np.asarray(batches)
  if batches.ndim != 2 or batches.shape[1] != cfg.batch_size:
    raise ValueError(
      f"graph epoch batches must be [steps, {cfg.batch_size}], got {list(batches.shape)}."
    )
  order = batches.reshape(-1)  # [steps * batch_size]
  return _batched(order, source, cfg, seed, host, num_hosts, first_step * cfg.batch_size)


def check_pk(cfg) -> None:
  """The batch must hold whole groups of K images (P x K and graph sampling)."""
  if cfg.batch_size % cfg.pk_k:
    raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of pk_k {cfg.pk_k}.")


def steps_per_epoch(source, cfg) -> int:
  """``pk``: P identities per batch, each once; ``graph``: one batch per identity (the
  authors' graph sampler: every class anchors one batch an epoch)."""
  if cfg.sampler == "pk":
    return len(np.unique(source.pids)) // (cfg.batch_size // cfg.pk_k)
  if cfg.sampler == "graph":
    return len(np.unique(source.pids))
  return len(source) // cfg.batch_size


def iterate(ds: grain.MapDataset, num_threads: int = 0) -> grain.DatasetIterator:
  """An iterator over ``ds`` whose threads decode in parallel (grain's ``get_state`` /
  ``set_state`` work on it; training resumes by slicing the dataset instead)."""
  opts = grain.ReadOptions(
    num_threads=num_threads or min(8, os.cpu_count() or 1),
    prefetch_buffer_size=2 * (num_threads or 2),
  )
  return iter(ds.to_iter_dataset(read_options=opts))


def eval_image(source, i: int, image_size: tuple[int, int]) -> np.ndarray:
  """Image ``i`` of ``source`` as evaluation sees it: decoded, resized, uint8 ``[H, W, 3]``."""
  ex = source[int(i)]
  return augment(decode(ex["image"], ex["where"]), image_size, "none", None)
