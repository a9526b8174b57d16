"""A feature index of an image folder (docs/method.md §14): every image's QAConv maps, its
global descriptor and what its file name says, for `qaconv_jax.search`.

Layout of an index folder::

  index.json        status ("building" / "complete"), the model (`TrainedModel.describe`,
                    its fingerprint included), map dtype and shape, counts, chunk size
  images.txt        the images asked for, in index order (sorted paths)
  maps.npy          [N, h, w, d] maps (float16 by default), memory-mapped when read
  descriptors.npy   [N, d] float32 unit global descriptors (`two_stage.global_descriptors`)
  metadata.csv      row, path, pid, camera, time (empty where the file name says nothing)
  skipped.csv       path, reason: the images that could not be read or decoded

While building, each chunk of ``chunk_size`` images is written to ``chunks/`` (maps,
descriptors and a JSON of its rows, each file renamed into place, the JSON last), so an
interrupted run resumes at the first chunk without its JSON. The final files are assembled
from the chunks, then ``index.json`` says "complete" and the chunks are removed.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import time

import jax
import numpy as np

from qaconv_jax.data.augment import augment, decode
from qaconv_jax.data.filenames import describe_names
from qaconv_jax.errors import CheckpointMismatch, DataError, MissingFile, OutputExists
from qaconv_jax.evaluation.scoring import Progress, extract_maps
from qaconv_jax.evaluation.two_stage import MAP_DTYPES, global_descriptors

FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(spec: str) -> list[str]:
  """A folder (searched recursively for `IMAGE_EXTENSIONS`) or a glob pattern (``**``
  spans folders) -> sorted absolute paths of image files."""
  if os.path.isdir(spec):
    found = [
      os.path.join(d, f)
      for d, _, files in os.walk(spec)
      for f in files
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  elif os.path.isfile(spec):
    found = [spec]
  else:
    found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if not found:
      raise MissingFile(f"no image folder, file or glob match: {spec}.")
  if not found:
    raise DataError(f"{spec} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
  return sorted(os.path.abspath(p) for p in found)


def load_image(path: str, image_size: tuple[int, int]) -> np.ndarray:
  """``path`` decoded and resized as evaluation does: float32 ``[H, W, 3]`` in [0, 1]."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise MissingFile(f"cannot read image {path}: {e.strerror or e}") from None
  return augment(decode(data, path), image_size, "none", None).astype(np.float32) / 255.0


class _Paths:
  """The random-access source `extract_maps` reads (only its length: images come from
  ``image``), recording instead of raising what cannot be loaded."""

  def __init__(self, paths: list[str], image_size: tuple[int, int]):
    self.paths, self.image_size = paths, image_size
    self.failed: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.paths)

  def image(self, i: int) -> np.ndarray:
    try:
      return load_image(self.paths[i], self.image_size)
    except (OSError, DataError) as e:
      self.failed[i] = str(e)
      return np.zeros((*self.image_size, 3), np.float32)


def _digest(paths: list[str]) -> str:
  return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def _write_atomic(path: str, write) -> None:
  """``write(file)`` into a temporary file renamed to ``path``: never a half file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _check_resumable(out: str, want: dict) -> dict | None:
  """The recorded ``index.json`` of ``out`` if it is this same index (model, images, dtype,
  chunk size); None when ``out`` is new or empty; `OutputExists` otherwise."""
  path = os.path.join(out, "index.json")
  if not os.path.isfile(path):
    if os.path.isdir(out) and os.listdir(out):
      raise OutputExists(f"{out} exists and holds no index: choose another --out.")
    return None
  with open(path) as f:
    info = json.load(f)
  diff = [
    f"{key}: index {info.get(key)!r} vs now {want[key]!r}"
    for key in ("images_sha256", "map_dtype", "chunk_size")
    if info.get(key) != want[key]
  ]
  if info.get("model", {}).get("fingerprint") != want["model"]["fingerprint"]:
    diff.insert(0, "another model (fingerprints differ)")
  if diff:
    raise OutputExists(
      f"{out} holds another index ({'; '.join(diff)}): choose another --out, or remove it "
      "to rebuild."
    )
  return info


def build_index(
  trained,
  images: list[str],
  out: str,
  map_dtype: str = "float16",
  chunk_size: int = 1024,
  batch_size: int | None = None,
) -> dict:
  """Indexes ``images`` with ``trained`` (a `TrainedModel`) into the folder ``out``, on
  every device of ``trained.mesh`` (every process computes, process 0 writes). Resumes an
  interrupted build of the same index. Returns ``{"images", "indexed", "skipped",
  "chunks", "chunks_done_before", "embedded" (images embedded by this call), "seconds"}``."""
  if map_dtype not in MAP_DTYPES:
    raise DataError(f"map dtype {map_dtype!r}: expected one of {list(MAP_DTYPES)}.")
  if chunk_size < 1:
    raise DataError(f"chunk size {chunk_size}: expected an integer >= 1.")
  if not images:
    raise DataError("no image to index.")
  main = jax.process_index() == 0
  want = {
    "format": FORMAT,
    "status": "building",
    "model": trained.describe(),
    "map_dtype": map_dtype,
    "chunk_size": chunk_size,
    "images_sha256": _digest(images),
    "num_images": len(images),
  }
  info = _check_resumable(out, want)
  chunks_dir = os.path.join(out, "chunks")
  num_chunks = math.ceil(len(images) / chunk_size)
  if info is not None and info["status"] == "complete":
    done = {"chunks": num_chunks, "chunks_done_before": num_chunks, "embedded": 0, "seconds": 0}
    return {**_counts(info), **done}
  if main and info is None:
    os.makedirs(chunks_dir, exist_ok=True)
    _write_atomic(os.path.join(out, "images.txt"), lambda f: f.write("\n".join(images).encode()))
    _write_json(os.path.join(out, "index.json"), want)
  _barrier("index prepared")
  todo = [c for c in range(num_chunks) if not os.path.exists(_chunk(chunks_dir, c, "json"))]
  start = time.perf_counter()
  remaining = sum(len(images[c * chunk_size : (c + 1) * chunk_size]) for c in todo)
  bar = Progress("indexing", remaining)
  for c in todo:
    paths = images[c * chunk_size : (c + 1) * chunk_size]
    maps, failed = _embed_chunk(trained, paths, map_dtype, batch_size, bar)
    if main:
      _write_chunk(chunks_dir, c, paths, maps, failed)
  _barrier("chunks written")
  if main:
    info = _assemble(out, want, images, num_chunks)
  _barrier("index assembled")
  with open(os.path.join(out, "index.json")) as f:
    info = json.load(f)
  seconds = time.perf_counter() - start
  done_before = num_chunks - len(todo)
  return {
    **_counts(info),
    "chunks": num_chunks,
    "chunks_done_before": done_before,
    "embedded": remaining,
    "seconds": seconds,
  }


def _counts(info: dict) -> dict:
  return {k: info[f"num_{k}"] for k in ("images", "indexed", "skipped")}


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _chunk(chunks_dir: str, c: int, kind: str) -> str:
  return os.path.join(chunks_dir, f"{c:06d}.{kind}")


def _embed_chunk(trained, paths, map_dtype, batch_size, bar):
  """``(maps [n, h, w, d] in map_dtype, {position: reason})`` of one chunk; the failed
  positions hold zero-image maps. A process loads only its rows of each batch, so each
  process's failures are gathered to all."""
  source = _Paths(paths, trained.image_size)
  maps = extract_maps(
    trained.embed,
    source,
    trained.image_size,
    batch_size or trained.config.eval.batch_size,
    mesh=trained.mesh,
    dtype=MAP_DTYPES[map_dtype],
    image=source.image,
    progress=bar,
  )
  failed = dict(source.failed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    flags = np.zeros(len(paths), bool)
    flags[list(failed)] = True
    gathered = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(paths))
    for i in np.flatnonzero(gathered.any(0)):
      failed.setdefault(int(i), "cannot read or decode the image (reported by another process)")
  return maps, failed


def _write_chunk(chunks_dir, c, paths, maps, failed) -> None:
  keep = np.array([i not in failed for i in range(len(paths))])
  kept = maps[keep]
  _write_atomic(_chunk(chunks_dir, c, "maps.npy"), lambda f: np.save(f, kept))
  desc = global_descriptors(kept)  # [n, d] float32, from the stored maps as eval's are
  _write_atomic(_chunk(chunks_dir, c, "desc.npy"), lambda f: np.save(f, desc))
  _write_json(
    _chunk(chunks_dir, c, "json"),
    {
      "kept": [p for p, k in zip(paths, keep) if k],
      "skipped": [[paths[i], failed[i]] for i in sorted(failed)],
    },
  )


def _assemble(out: str, info: dict, images: list[str], num_chunks: int) -> dict:
  """The final files from the chunks, then ``index.json`` marked complete."""
  chunks_dir = os.path.join(out, "chunks")
  rows, kept, skipped = [], [], []
  for c in range(num_chunks):
    with open(_chunk(chunks_dir, c, "json")) as f:
      part = json.load(f)
    kept += part["kept"]
    skipped += part["skipped"]
    rows.append(len(part["kept"]))
  if not kept:
    raise DataError(
      f"none of the {len(images)} images could be read or decoded (the first: "
      f"{skipped[0][0]}: {skipped[0][1]})."
    )
  first = np.load(_chunk(chunks_dir, 0, "maps.npy"), mmap_mode="r")
  maps = np.lib.format.open_memmap(
    os.path.join(out, "maps.npy.tmp"), "w+", first.dtype, (len(kept), *first.shape[1:])
  )
  descs = np.zeros((len(kept), first.shape[-1]), np.float32)
  lo = 0
  for c, n in enumerate(rows):
    maps[lo : lo + n] = np.load(_chunk(chunks_dir, c, "maps.npy"), mmap_mode="r")
    descs[lo : lo + n] = np.load(_chunk(chunks_dir, c, "desc.npy"))
    lo += n
  maps.flush()
  del maps
  os.replace(os.path.join(out, "maps.npy.tmp"), os.path.join(out, "maps.npy"))
  _write_atomic(os.path.join(out, "descriptors.npy"), lambda f: np.save(f, descs))
  _write_csv(
    os.path.join(out, "metadata.csv"),
    ["row", "path", "pid", "camera", "time"],
    [
      [r, p, _cell(n.pid), _cell(n.camera), _cell(n.time)]
      for r, (p, n) in enumerate(zip(kept, describe_names(kept)))
    ],
  )
  _write_csv(os.path.join(out, "skipped.csv"), ["path", "reason"], skipped)
  info = {
    **info,
    "status": "complete",
    "num_indexed": len(kept),
    "num_skipped": len(skipped),
    "map_shape": list(first.shape[1:]),
  }
  _write_json(os.path.join(out, "index.json"), info)
  shutil.rmtree(chunks_dir)
  return info


def _cell(v) -> str:
  return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _write_csv(path: str, header: list[str], rows: list) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  os.replace(tmp, path)


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


def open_index(path: str) -> FeatureIndex:
  """Reads the complete index in the folder ``path``."""
  info_path = os.path.join(path, "index.json")
  if not os.path.isfile(info_path):
    raise MissingFile(f"{path} is no index (no index.json); build one with qaconv_jax.index.")
  with open(info_path) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise DataError(f"{path} is an index of format {info.get('format')}; expected {FORMAT}.")
  if info["status"] != "complete":
    raise DataError(
      f"{path} is incomplete (its build was interrupted): run qaconv_jax.index again with the "
      "same arguments to finish it."
    )
  maps = np.load(os.path.join(path, "maps.npy"), mmap_mode="r")
  descriptors = np.load(os.path.join(path, "descriptors.npy"))
  with open(os.path.join(path, "metadata.csv"), newline="") as f:
    records = [
      {
        "path": r["path"],
        "pid": int(r["pid"]) if r["pid"] else None,
        "camera": int(r["camera"]) if r["camera"] else None,
        "time": float(r["time"]) if r["time"] else None,
      }
      for r in csv.DictReader(f)
    ]
  if not len(maps) == len(descriptors) == len(records) == info["num_indexed"]:
    raise DataError(
      f"{path} is corrupt: {len(maps)} maps, {len(descriptors)} descriptors and "
      f"{len(records)} metadata rows, but index.json says {info['num_indexed']} images."
    )
  return FeatureIndex(path, info, maps, descriptors, records)
