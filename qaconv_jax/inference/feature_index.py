"""A feature index of an image folder (docs/method.md §14): every image's QAConv maps, its
global descriptor and what its file name says, for `qaconv_jax.search`. This module holds
the layout, the image listing and reading; `index_build` writes an index.

Layout of an index folder::

  index.json        status ("building" / "complete"), the model (`TrainedModel.describe`,
                    its fingerprint included), map dtype and shape, counts, chunk size
  images.txt        the images asked for, in index order (sorted paths)
  maps.npy          [N, h, w, d] maps (float16 by default), memory-mapped when read
  descriptors.npy   [N, d] float32 unit global descriptors (`two_stage.global_descriptors`)
  metadata.csv      row, path, pid, camera, time (empty where the file name says nothing)
  skipped.csv       path, reason: the images that could not be read or decoded

Paths are stored as the file system gives them; names that are not valid UTF-8 survive the
CSV files through Python's ``surrogateescape``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os

import numpy as np

from qaconv_jax.data.augment import augment, decode
from qaconv_jax.errors import CheckpointMismatch, DataError, MissingFile
from qaconv_jax.evaluation.two_stage import MAP_DTYPES

FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# CSV files: UTF-8, with file names that are not UTF-8 kept byte for byte.
CSV_TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


def list_images(spec: str) -> list[str]:
  """A folder (searched recursively) or a glob pattern (``**`` spans folders) -> the sorted
  absolute paths of its files with an image extension (`IMAGE_EXTENSIONS`); a file named
  directly is taken whatever its extension."""
  if os.path.isfile(spec):
    return [os.path.abspath(spec)]
  if os.path.isdir(spec):
    found = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files]
  else:
    found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if not found:
      raise MissingFile(f"no image folder, file or glob match: {spec}.")
  found = [p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise DataError(f"{spec} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
  return sorted(os.path.abspath(p) for p in found)


def read_image(path: str, image_size: tuple[int, int]) -> np.ndarray:
  """``path`` decoded and resized as evaluation does: uint8 ``[H, W, 3]``."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise MissingFile(f"cannot read image {path}: {e.strerror or e}") from None
  return augment(decode(data, path), image_size, "none", None)


def load_image(path: str, image_size: tuple[int, int]) -> np.ndarray:
  """`read_image` as the model takes it: float32 ``[H, W, 3]`` in [0, 1]."""
  return read_image(path, image_size).astype(np.float32) / 255.0


def load_maps(path: str, dtype: str, mmap: bool = True) -> np.ndarray:
  """An ``.npy`` of maps stored as ``dtype`` (a `MAP_DTYPES` name). NumPy writes bfloat16
  as raw 2-byte records; they are viewed back as bfloat16."""
  a = np.load(path, mmap_mode="r" if mmap else None)
  want = np.dtype(MAP_DTYPES[dtype])
  return a.view(want) if a.dtype != want and a.dtype.itemsize == want.itemsize else a


@dataclasses.dataclass
class FeatureIndex:
  """A complete index, read back: ``maps [N, h, w, d]`` (memory-mapped), ``descriptors
  [N, d]``, ``records`` (one dict per row: path, pid, camera, time; None where unknown)."""

  path: str
  info: dict
  maps: np.ndarray
  descriptors: np.ndarray
  records: list[dict]

  @property
  def fingerprint(self) -> str:
    return self.info["model"]["fingerprint"]

  def check_model(self, fingerprint: str, what: str) -> None:
    """Raises `CheckpointMismatch` unless ``fingerprint`` is the index's model."""
    if fingerprint != self.fingerprint:
      m = self.info["model"]
      raise CheckpointMismatch(
        f"{self.path} was built with another model (workdir {m['workdir']}, step {m['step']}, "
        f"fingerprint {self.fingerprint[:12]}) than {what} (fingerprint {fingerprint[:12]}): "
        "search it with that model, or index the images again with this one."
      )


def read_info(path: str) -> dict:
  """The ``index.json`` of the index folder ``path``."""
  info_path = os.path.join(path, "index.json")
  if not os.path.isfile(info_path):
    raise MissingFile(f"{path} is no index (no index.json); build one with qaconv_jax.index.")
  try:
    with open(info_path) as f:
      info = json.load(f)
    _ = (info["status"], info["model"]["fingerprint"])  # present, or the file is corrupt
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{info_path} is corrupt ({type(e).__name__}: {e}).") from None
  if info.get("format") != FORMAT:
    raise DataError(f"{path} is an index of format {info.get('format')}; expected {FORMAT}.")
  return info


def open_index(path: str) -> FeatureIndex:
  """Reads the complete index in the folder ``path``."""
  info = read_info(path)
  if info["status"] != "complete":
    raise DataError(
      f"{path} is incomplete (its build was interrupted): run qaconv_jax.index again with the "
      "same arguments to finish it."
    )
  try:
    maps = load_maps(os.path.join(path, "maps.npy"), info["map_dtype"])
    descriptors = np.load(os.path.join(path, "descriptors.npy"))
    with open(os.path.join(path, "metadata.csv"), **CSV_TEXT) as f:
      records = [
        {
          "path": r["path"],
          "pid": int(r["pid"]) if r["pid"] else None,
          "camera": int(r["camera"]) if r["camera"] else None,
          "time": float(r["time"]) if r["time"] else None,
        }
        for r in csv.DictReader(f)
      ]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is corrupt ({type(e).__name__}: {e}).") from None
  if not len(maps) == len(descriptors) == len(records) == info["num_indexed"]:
    raise DataError(
      f"{path} is corrupt: {len(maps)} maps, {len(descriptors)} descriptors and "
      f"{len(records)} metadata rows, but index.json says {info['num_indexed']} images."
    )
  return FeatureIndex(path, info, maps, descriptors, records)
