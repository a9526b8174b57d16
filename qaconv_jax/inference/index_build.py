"""Building a feature index (the layout: `feature_index`; docs/method.md §14).

The images are embedded in chunks of ``chunk_size`` on every device of every process. Each
chunk's maps, descriptors and row list go to ``chunks/``, each file renamed into place and
the row list last, so an interrupted build resumes at the first chunk without a row list.
The final files are then assembled from the chunks, ``index.json`` says "complete", and the
chunks are removed. Process 0 decides what to do and writes every file; the other processes
follow its decisions (broadcast), so they never act on a shared file system's stale view.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import shutil
import time

import jax
import numpy as np

from qaconv_jax.data.filenames import describe_names
from qaconv_jax.errors import ConfigError, DataError, OutputExists, QAConvError
from qaconv_jax.evaluation.scoring import Progress, extract_maps
from qaconv_jax.evaluation.two_stage import MAP_DTYPES, global_descriptors
from qaconv_jax.inference.feature_index import (
  CSV_TEXT,
  FORMAT,
  load_image,
  load_maps,
  read_info,
)


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


def build_index(
  trained,
  images: list[str],
  out: str,
  map_dtype: str = "float16",
  chunk_size: int = 1024,
  batch_size: int | None = None,
) -> dict:
  """Indexes ``images`` with ``trained`` (a `TrainedModel`) into the folder ``out``,
  resuming an interrupted build of the same index. Every process of a multi-process run
  calls it with the same image list, and each returns the same summary: ``{"images",
  "indexed", "skipped", "chunks", "chunks_done_before", "embedded" (images embedded by this
  call), "already_complete", "seconds"}``."""
  if map_dtype not in MAP_DTYPES:
    raise ConfigError(f"map dtype {map_dtype!r}: expected one of {list(MAP_DTYPES)}.")
  for name, value in (
    ("chunk size", chunk_size),
    ("batch size", 1 if batch_size is None else batch_size),
  ):
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"{name} {value!r}: expected an integer >= 1.")
  if not images:
    raise DataError("no image to index.")
  main = jax.process_index() == 0
  want = {
    "format": FORMAT,
    "status": "building",
    "model": trained.describe(),
    "map_dtype": map_dtype,
    "chunk_size": chunk_size,
    "images_sha256": hashlib.sha256(b"\n".join(map(os.fsencode, images))).hexdigest(),
    "num_images": len(images),
  }
  num_chunks = math.ceil(len(images) / chunk_size)
  chunks_dir = os.path.join(out, "chunks")
  start = time.perf_counter()

  # ---------------------------------------------------------------- process 0 decides
  _same_everywhere(want["images_sha256"])
  prepared = _on_process_0(lambda: _prepare(out, want, images, num_chunks), f"preparing {out}")
  plan = _from_process_0(np.array([0] * (num_chunks + 1) if not main else prepared, np.int32))
  summary = {"chunks": num_chunks, "chunks_done_before": int(plan[1:].sum()), "seconds": 0.0}
  if plan[0]:
    counts = _on_process_0(lambda: _counts(read_info(out)), f"reading {out}")
    return {**_shared_counts(counts), **summary, "embedded": 0, "already_complete": True}

  # ---------------------------------------------------------------- embed the chunks left
  todo = np.flatnonzero(plan[1:] == 0)
  chunk = lambda c: images[c * chunk_size : (c + 1) * chunk_size]
  remaining = sum(len(chunk(c)) for c in todo)
  bar = Progress("indexing", remaining)
  for c in todo:
    maps, failed = _embed_chunk(trained, chunk(c), map_dtype, batch_size, bar)
    write = lambda: _write_chunk(chunks_dir, int(c), chunk(c), maps, failed)  # noqa: B023
    _on_process_0(write, f"writing chunk {c} of {out}")

  # ---------------------------------------------------------------- assemble
  rows = _on_process_0(lambda: _kept_rows(chunks_dir, num_chunks), "counting rows")
  kept, first = rows if main else (0, None)
  if _from_process_0(np.int64(kept if main else 0)) == 0:
    why = f" (the first: {first[0]}: {first[1]})" if main and first else ""
    raise DataError(f"none of the {len(images)} images could be read or decoded{why}.")
  counts = _on_process_0(lambda: _assemble(out, want, num_chunks), f"assembling {out}")
  summary["seconds"] = time.perf_counter() - start
  return {**_shared_counts(counts), **summary, "embedded": remaining, "already_complete": False}


def _on_process_0(fn, what: str):
  """``fn()`` on process 0 (None elsewhere). Every process learns whether it failed and
  raises then, so none is left waiting in a collective: process 0 its own error (a write
  that failed as `OutputExists`), the others one that points at process 0's."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except QAConvError as e:
      error = e
    except OSError as e:  # an output that cannot be written: a folder, permissions, space
      error = OutputExists(f"{what} failed: {e}.")
    except BaseException as e:  # a bug or an interrupt: raised as it is, after telling
      error = e
  if _from_process_0(np.int32(error is not None)):
    if error is not None:
      raise error
    raise DataError(f"{what} failed on process 0 (its output says why).")
  return result


def _same_everywhere(digest: str) -> None:
  """Refuses, on every process, image lists that differ between processes (a file system
  that is not shared, or changing while the processes list it)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
  if (every != every[0]).any():
    raise DataError(
      "the processes list different images (is the image folder on a file system all hosts "
      "share, and unchanged while indexing?)."
    )


def _shared_counts(counts: dict | None) -> dict:
  """Process 0's ``counts`` on every process."""
  keys = ("images", "indexed", "skipped")
  values = np.array([counts[k] for k in keys] if counts else [0, 0, 0], np.int64)
  return dict(zip(keys, (int(v) for v in _from_process_0(values))))


def _counts(info: dict) -> dict:
  return {k: info[f"num_{k}"] for k in ("images", "indexed", "skipped")}


def _from_process_0(value: np.ndarray) -> np.ndarray:
  """``value`` as process 0 has it, on every process (a barrier too)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _prepare(out: str, want: dict, images: list[str], num_chunks: int) -> list:
  """Process 0: ``[complete, done of chunk 0, ...]`` for the index in ``out``, created when
  new; `OutputExists` when ``out`` holds anything else than this same index."""
  info_path = os.path.join(out, "index.json")
  if os.path.exists(out) and not os.path.isdir(out):
    raise OutputExists(f"{out} is a file, not an index folder: choose another --out.")
  if os.path.isfile(info_path):
    info = read_info(out)
    diff = [
      f"{key}: index {info.get(key)!r} vs now {want[key]!r}"
      for key in ("images_sha256", "map_dtype", "chunk_size")
      if info.get(key) != want[key]
    ]
    if info["model"]["fingerprint"] != want["model"]["fingerprint"]:
      diff.insert(0, "another model (fingerprints differ)")
    if diff:
      raise OutputExists(
        f"{out} holds another index ({'; '.join(diff)}): choose another --out, or remove it "
        "to rebuild."
      )
  elif os.path.isdir(out) and os.listdir(out):
    raise OutputExists(f"{out} exists and holds no index: choose another --out.")
  else:
    os.makedirs(out, exist_ok=True)
    _write_json(info_path, want)  # first: from now on a rerun resumes this index
    info = want
  chunks_dir = os.path.join(out, "chunks")
  for stale in glob.glob(os.path.join(glob.escape(out), "*.tmp*")) + glob.glob(
    os.path.join(glob.escape(chunks_dir), "*.tmp*")
  ):
    os.remove(stale)  # half-written files of an interrupted run
  if info["status"] == "complete":
    shutil.rmtree(chunks_dir, ignore_errors=True)  # left if the run ended right after
    return [1] * (num_chunks + 1)
  os.makedirs(chunks_dir, exist_ok=True)
  if not os.path.isfile(os.path.join(out, "images.txt")):
    _write_atomic(os.path.join(out, "images.txt"), lambda f: f.write(_lines(images)))
  return [0] + [os.path.exists(_chunk(chunks_dir, c, "json")) for c in range(num_chunks)]


def _lines(paths: list[str]) -> bytes:
  return b"\n".join(map(os.fsencode, paths)) + b"\n"


def _write_atomic(path: str, write) -> None:
  """``write(file)`` into a temporary file renamed to ``path``: never a half file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


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
  rows = {
    "kept": [p for p, k in zip(paths, keep) if k],
    "skipped": [[paths[i], failed[i]] for i in sorted(failed)],
  }
  # File names that are not UTF-8 travel as their surrogate escapes (ensure_ascii).
  _write_json(_chunk(chunks_dir, c, "json"), rows)


def _read_rows(chunks_dir: str, c: int) -> dict:
  with open(_chunk(chunks_dir, c, "json")) as f:
    return json.load(f)


def _kept_rows(chunks_dir: str, num_chunks: int) -> tuple[int, list | None]:
  """``(rows kept, the first skipped [path, reason] or None)`` over every chunk."""
  parts = [_read_rows(chunks_dir, c) for c in range(num_chunks)]
  skipped = [s for part in parts for s in part["skipped"]]
  return sum(len(part["kept"]) for part in parts), (skipped[0] if skipped else None)


def _assemble(out: str, info: dict, num_chunks: int) -> dict:
  """Process 0: the final files from the chunks, then ``index.json`` marked complete;
  returns the counts."""
  chunks_dir = os.path.join(out, "chunks")
  parts = [_read_rows(chunks_dir, c) for c in range(num_chunks)]
  kept = [p for part in parts for p in part["kept"]]
  skipped = [s for part in parts for s in part["skipped"]]
  dtype = info["map_dtype"]
  shape = load_maps(_chunk(chunks_dir, 0, "maps.npy"), dtype).shape[1:]
  tmp = os.path.join(out, f"maps.npy.tmp{os.getpid()}")
  maps = np.lib.format.open_memmap(tmp, "w+", np.dtype(MAP_DTYPES[dtype]), (len(kept), *shape))
  descs = np.zeros((len(kept), shape[-1]), np.float32)
  lo = 0
  for c, part in enumerate(parts):
    n = len(part["kept"])
    maps[lo : lo + n] = load_maps(_chunk(chunks_dir, c, "maps.npy"), dtype)
    descs[lo : lo + n] = np.load(_chunk(chunks_dir, c, "desc.npy"))
    lo += n
  maps.flush()
  del maps
  os.replace(tmp, os.path.join(out, "maps.npy"))
  _write_atomic(os.path.join(out, "descriptors.npy"), lambda f: np.save(f, descs))
  names = describe_names(kept)
  cell = lambda v: "" if v is None else repr(v) if isinstance(v, float) else str(v)
  _write_csv(
    os.path.join(out, "metadata.csv"),
    ["row", "path", "pid", "camera", "time"],
    [
      [r, p, cell(n.pid), cell(n.camera), cell(n.time)] for r, (p, n) in enumerate(zip(kept, names))
    ],
  )
  _write_csv(os.path.join(out, "skipped.csv"), ["path", "reason"], skipped)
  done = {"num_indexed": len(kept), "num_skipped": len(skipped), "map_shape": list(shape)}
  _write_json(os.path.join(out, "index.json"), {**info, **done, "status": "complete"})
  shutil.rmtree(chunks_dir)
  return {"images": info["num_images"], "indexed": len(kept), "skipped": len(skipped)}


def _write_csv(path: str, header: list[str], rows: list) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", **CSV_TEXT) as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  os.replace(tmp, path)
