"""Run an exported QAConv model (``python -m qaconv_jax.export``) with jax and numpy alone.

  from qaconv_jax import exported
  model = exported.load("export_dir")
  maps = model.embed(images)            # float32 [n, H, W, 3] RGB in [0, 1] -> [n, h, w, d]
  dist = model.distance(q_maps, g_maps)  # [q, g], smaller is more alike

The folder holds the two functions as serialised StableHLO (`jax.export`, a symbolic batch
dimension, lowered for CPU and CUDA), the weights as plain arrays (``weights.npz``, read
without pickle) and ``model.json`` (input size, normalisation, map shape, distance, model
settings and the fingerprint an index records). This module imports neither Flax nor the
model code, so a service needs only ``jax`` and ``numpy`` (``flatbuffers`` for jax.export).
Images are expected as the model saw them in evaluation: RGB, resized to ``input_size``
(PIL bicubic), scaled to [0, 1]; normalisation, if any, happens inside ``embed``.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from jax import export as jax_export

FORMAT = 1
EMBED_FILE, DISTANCE_FILE = "embed.jax_exported", "distance.jax_exported"
WEIGHTS_FILE, INFO_FILE = "weights.npz", "model.json"
# Bytes of pair similarities per distance call, by platform. On a 2-core CPU at 24x8 maps,
# 16 MB blocks (small enough to stay in cache) ran 3.7x faster than 512 MB ones; others get
# 1 GB blocks (unmeasured: no accelerator was at hand).
DEFAULT_BUDGET = {"cpu": 2**24}


class ExportedModel:
  """An exported model on this process's default device (see the module docstring)."""

  def __init__(self, directory: str):
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory} holds no exported model (no {INFO_FILE}).")
    with open(path) as f:
      self.info = json.load(f)
    if self.info.get("format") != FORMAT:
      raise ValueError(
        f"{directory} is an export of format {self.info.get('format')}; this code reads {FORMAT}."
      )
    platform = jax_export.default_export_platform()  # "cuda"/"rocm", not "gpu"
    if platform not in self.info["platforms"]:
      raise RuntimeError(
        f"{directory} was exported for {self.info['platforms']}, but JAX runs on {platform}: "
        "export it again with --platforms including it."
      )
    self.platform = platform
    with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as w:
      weights = [w[f"w{i:05d}"] for i in range(self.info["num_weights"])]
    self._weights = jax.device_put(weights)
    self._embed = jax.jit(_deserialize(os.path.join(directory, EMBED_FILE)).call)
    self._distance = jax.jit(_deserialize(os.path.join(directory, DISTANCE_FILE)).call)

  @property
  def input_size(self) -> tuple[int, int]:
    """``(H, W)`` the images must have."""
    return self.info["input"]["height"], self.info["input"]["width"]

  @property
  def map_shape(self) -> tuple[int, int, int]:
    """``(h, w, d)`` of one feature map."""
    m = self.info["maps"]
    return m["h"], m["w"], m["d"]

  @property
  def fingerprint(self) -> str:
    return self.info["fingerprint"]

  def embed(self, images, batch_size: int = 64) -> np.ndarray:
    """float32 ``[n, H, W, 3]`` RGB in [0, 1] -> unit feature maps ``[n, h, w, d]``.

    Calls take ``batch_size`` images, fewer padded up to a power of two, so a service
    compiles a handful of shapes, not one per request size."""
    images = np.asarray(images, np.float32)
    h, w = self.input_size
    if images.ndim != 4 or images.shape[1:] != (h, w, 3):
      raise ValueError(f"images must be [n, {h}, {w}, 3] RGB in [0, 1]; got {images.shape}.")
    out = []
    for lo in range(0, len(images), batch_size):
      part = images[lo : lo + batch_size]
      size = min(batch_size, _pow2_at_least(len(part)))
      out.append(np.asarray(self._embed(self._weights, _pad(part, size)))[: len(part)])
    return np.concatenate(out) if out else np.zeros((0, *self.map_shape), np.float32)

  def distance(self, query_maps, gallery_maps, budget_bytes: float | None = None) -> np.ndarray:
    """``[q, g]`` float32 distances of ``query_maps [q, h, w, d]`` to ``gallery_maps
    [g, h, w, d]`` (the distance ``info["distance"]`` names, which search ranks by). Pairs
    are scored in blocks whose ``[pairs, hw, hw]`` similarities fit ``budget_bytes``
    (default: `DEFAULT_BUDGET` of this backend)."""
    budget_bytes = budget_bytes or DEFAULT_BUDGET.get(self.platform, 2**30)
    q_maps = np.asarray(query_maps, np.float32)
    g_maps = np.asarray(gallery_maps, np.float32)
    for name, x in (("query", q_maps), ("gallery", g_maps)):
      if x.ndim != 4 or x.shape[1:] != self.map_shape:
        raise ValueError(
          f"{name} maps must be [n, {', '.join(map(str, self.map_shape))}]; got {x.shape}."
        )
    h, w, _ = self.map_shape
    pairs = max(1, int(budget_bytes // (2 * 4 * (h * w) ** 2)))
    # Powers of two: a service meets a handful of block shapes whatever its request sizes.
    bq = min(_pow2_at_least(len(q_maps)), _pow2_at_most(math.isqrt(pairs)))
    bg = min(_pow2_at_least(len(g_maps)), _pow2_at_most(pairs // bq))
    out = np.zeros((len(q_maps), len(g_maps)), np.float32)
    # Edge blocks padded to the block shape: one compilation per (bq, bg).
    for i in range(0, len(q_maps), bq):
      q_block = _pad(q_maps[i : i + bq], bq)
      for j in range(0, len(g_maps), bg):
        block = self._distance(self._weights, q_block, _pad(g_maps[j : j + bg], bg))
        out[i : i + bq, j : j + bg] = np.asarray(block)[: len(q_maps) - i, : len(g_maps) - j]
    return out


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  """``x`` with zero rows appended up to ``n`` rows (each row's output is its own)."""
  return x if len(x) == n else np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def _deserialize(path: str):
  with open(path, "rb") as f:
    return jax_export.deserialize(bytearray(f.read()))


def load(directory: str) -> ExportedModel:
  """The exported model in ``directory`` (written by ``python -m qaconv_jax.export``)."""
  return ExportedModel(directory)
