"""TFDS builders for the re-ID datasets, written as array_record and read without TensorFlow.

Splits ``train`` / ``query`` / ``gallery`` with features ``image`` (the original encoded
file), ``pid`` (train relabelled 0..N-1, query/gallery raw), ``camera`` (0-based), ``time``
(float64 seconds, NaN when unknown) and ``filename``. Prepare with
``python -m qaconv_jax.data.prepare --dataset market1501 --manual-dir DIR --data-dir DIR``.

Records are written in generation order (``disable_shuffling``), and each split's pid,
camera, time and filename are also stored as arrays in the dataset's ``metadata.json``, so
``TfdsSource`` learns them without reading the records (and their image bytes).
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow_datasets as tfds

from qaconv_jax.data.datasets import load_dataset
from qaconv_jax.errors import ConfigError, DataError, MissingFile

SPLITS = ("train", "query", "gallery")
# The per-record fields kept in the metadata, in TfdsSource's order of checks.
META_FIELDS = ("pid", "camera", "time", "filename")


class _ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "1.1.0": (
      "time stored as float64 bytes (1.0.0 kept float32: Duke and late Market "
      "times lost precision); records in generation order, with per-split "
      "pid/camera/time/filename arrays in metadata.json so they are read without "
      "the images."
    ),
  }
  DATASET: str = ""
  IMAGE_FORMAT = "jpeg"

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS's name)
    return (
      f"Put the {self.DATASET} dataset in its standard layout in manual_dir (see "
      "qaconv_jax.data.datasets) and pass --manual-dir."
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self.DATASET} person re-identification (qaconv-jax layout).",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT),
          "pid": tfds.features.Scalar(np.int64),
          "camera": tfds.features.Scalar(np.int64),
          # Not Scalar(np.float64): tf.train.Example has only a float32 list, and TFDS
          # puts every float there, silently rounding. Raw bytes keep all 64 bits.
          "time": tfds.features.Tensor(
            shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES
          ),
          "filename": tfds.features.Text(),
        }
      ),
      # Data-source index i is then the i-th generated record, as the metadata assumes.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    ds = load_dataset(self.DATASET, root)
    generators = {}
    for split in SPLITS:
      records = getattr(ds, split)
      rels = [os.path.relpath(r.path, root) for r in records]
      # JSON keeps a Python float's repr exactly (NaN included), so times stay float64.
      self.info.metadata[split] = {
        "pid": [r.pid for r in records],
        "camera": [r.camera for r in records],
        "time": [float(r.time) for r in records],
        "filename": rels,
      }
      generators[split] = self._generate_examples(records, rels)
    return generators

  def _generate_examples(self, records, rels):
    for i, (r, rel) in enumerate(zip(records, rels)):
      # An int key: with disable_shuffling, TFDS writes the records sorted by it.
      # A path as image: TFDS copies the encoded file as is (no re-encoding, no TensorFlow).
      yield i, {"image": r.path, "pid": r.pid, "camera": r.camera, "time": r.time, "filename": rel}


def _builder(name: str, dataset: str, image_format: str = "jpeg"):
  return type(
    name,
    (_ReidBuilder,),
    {"name": dataset, "DATASET": dataset, "IMAGE_FORMAT": image_format, "__module__": __name__},
  )


BUILDERS = {
  "market1501": _builder("Market1501", "market1501"),
  "dukemtmc": _builder("Dukemtmc", "dukemtmc"),
  "msmt17": _builder("Msmt17", "msmt17"),
  "cuhk03_detected": _builder("Cuhk03Detected", "cuhk03_detected", "png"),
  "cuhk03_labeled": _builder("Cuhk03Labeled", "cuhk03_labeled", "png"),
}


def get_builder(dataset: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if dataset not in BUILDERS:
    raise ConfigError(f"no TFDS builder for {dataset!r}; expected one of {sorted(BUILDERS)}.")
  return BUILDERS[dataset](data_dir=data_dir)


def prepare(dataset: str, manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Parses ``manual_dir`` and writes the array_record dataset under ``data_dir``."""
  builder = get_builder(dataset, data_dir)
  builder.download_and_prepare(
    file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
  )
  return builder


def _prepare_command(dataset: str, data_dir: str) -> str:
  return (
    f"python -m qaconv_jax.data.prepare --dataset {dataset} --manual-dir DIR --data-dir {data_dir}"
  )


def _prepared_versions(dataset_dir: str) -> list[tfds.core.Version]:
  """Versions with a finished preparation (a dataset_info.json) under ``dataset_dir``."""
  if not os.path.isdir(dataset_dir):
    return []
  return sorted(
    tfds.core.Version(v)
    for v in os.listdir(dataset_dir)
    if tfds.core.Version.is_valid(v)
    and os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))
  )


class TfdsSource:
  """Random access to one split of a prepared dataset; images stay encoded bytes (decoded
  by the pipeline, exactly as for raw folders).

  Attributes:
    pids: ``[N]`` int64. cameras: ``[N]`` int64, 0-based. times: ``[N]`` float64 seconds
      (NaN when unknown). names: ``N`` filenames relative to the dataset folder. All read
      from the metadata, not from the records.
  """

  def __init__(self, dataset: str, split: str, data_dir: str):
    builder = get_builder(dataset, data_dir)
    if not builder.is_prepared():
      current = builder.version
      others = [v for v in _prepared_versions(os.path.dirname(builder.data_dir)) if v != current]
      if others:
        age = "an older" if others[-1] < current else "a newer"
        raise MissingFile(
          f"the {dataset} dataset under {data_dir} was prepared by {age} version of its "
          f"builder ({others[-1]}); this code reads version {current}, so prepare it again "
          f"with the same command: {_prepare_command(dataset, data_dir)}"
        )
      raise MissingFile(
        f"no prepared {dataset} dataset under {data_dir}; run {_prepare_command(dataset, data_dir)}"
      )
    self._redo = (
      f"the prepared {dataset} dataset in {builder.data_dir} is inconsistent; "
      f"prepare it again: {_prepare_command(dataset, data_dir)}"
    )
    self.source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    metadata = builder.info.metadata
    meta = metadata.get(split) if metadata is not None else None
    if not isinstance(meta, dict) or any(k not in meta for k in META_FIELDS):
      raise DataError(f"{self._redo} (metadata.json has no usable {split} metadata)")
    lengths = {k: len(meta[k]) for k in META_FIELDS}
    if set(lengths.values()) != {len(self.source)}:
      raise DataError(
        f"{self._redo} (the {split} split holds {len(self.source)} records, its metadata {lengths})"
      )
    self.pids = np.array(meta["pid"], np.int64)
    self.cameras = np.array(meta["camera"], np.int64)
    self.times = np.array(meta["time"], np.float64)
    self.names = [str(n) for n in meta["filename"]]
    # Spot checks: a folder mixed from two preparations, or shuffled records, shows here.
    n = len(self.source)
    for i in sorted({0, n // 2, n - 1} if n else set()):
      self._check(i)

  def _check(self, i: int) -> None:
    ex = self[i]
    want = {
      "pid": int(self.pids[i]),
      "camera": int(self.cameras[i]),
      "time": float(self.times[i]),
      "where": self.names[i],
    }
    got = {k: ex[k] for k in want}
    same_time = got["time"] == want["time"] or (
      math.isnan(got["time"]) and math.isnan(want["time"])
    )
    if not same_time or any(got[k] != want[k] for k in ("pid", "camera", "where")):
      raise DataError(f"{self._redo} (record {i} holds {got}, its metadata {want})")

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    ex = self.source[i]
    return {
      "image": ex["image"],
      "pid": int(ex["pid"]),
      "camera": int(ex["camera"]),
      "time": float(ex["time"]),
      "where": _text(ex["filename"]),
    }


def _text(value) -> str:
  """A TFDS Text feature as str (the data source hands back bytes)."""
  return value.decode() if isinstance(value, bytes) else value
