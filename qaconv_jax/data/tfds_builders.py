"""TFDS builders for the re-ID datasets, written as array_record and read without TensorFlow.

Splits ``train`` / ``query`` / ``gallery`` with features ``image`` (the original encoded
file), ``pid`` (train relabelled 0..N-1, query/gallery raw), ``camera`` (0-based), ``time``
(seconds, NaN when unknown) and ``filename``. Prepare with
``python -m qaconv_jax.data.prepare --dataset market1501 --manual-dir DIR --data-dir DIR``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from qaconv_jax.data.datasets import load_dataset

SPLITS = ("train", "query", "gallery")


class _ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DATASET: str = ""
  IMAGE_FORMAT = "jpeg"

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS's name)
    return (f"Put the {self.DATASET} dataset in its standard layout in manual_dir (see "
            "qaconv_jax.data.datasets) and pass --manual-dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} person re-identification (qaconv-jax layout).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=self.IMAGE_FORMAT),
            "pid": tfds.features.Scalar(np.int64),
            "camera": tfds.features.Scalar(np.int64),
            "time": tfds.features.Scalar(np.float32),
            "filename": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    ds = load_dataset(self.DATASET, os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(getattr(ds, split), os.fspath(dl_manager.manual_dir))
            for split in SPLITS}

  def _generate_examples(self, records, root):
    for r in records:
      rel = os.path.relpath(r.path, root)
      # A path: TFDS copies the encoded file as is (no re-encoding, no TensorFlow).
      yield rel, {"image": r.path, "pid": r.pid, "camera": r.camera, "time": r.time,
                  "filename": rel}


def _builder(name: str, dataset: str, image_format: str = "jpeg"):
  return type(name, (_ReidBuilder,), {"name": dataset, "DATASET": dataset,
                                      "IMAGE_FORMAT": image_format, "__module__": __name__})


BUILDERS = {
    "market1501": _builder("Market1501", "market1501"),
    "dukemtmc": _builder("Dukemtmc", "dukemtmc"),
    "msmt17": _builder("Msmt17", "msmt17"),
    "cuhk03_detected": _builder("Cuhk03Detected", "cuhk03_detected", "png"),
    "cuhk03_labeled": _builder("Cuhk03Labeled", "cuhk03_labeled", "png"),
}


def get_builder(dataset: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if dataset not in BUILDERS:
    raise ValueError(f"no TFDS builder for {dataset!r}; expected one of {sorted(BUILDERS)}.")
  return BUILDERS[dataset](data_dir=data_dir)


def prepare(dataset: str, manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Parses ``manual_dir`` and writes the array_record dataset under ``data_dir``."""
  builder = get_builder(dataset, data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


class TfdsSource:
  """Random access to one split of a prepared dataset; images stay encoded bytes (decoded
  by the pipeline, exactly as for raw folders)."""

  def __init__(self, dataset: str, split: str, data_dir: str):
    builder = get_builder(dataset, data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"no prepared {dataset} dataset under {data_dir}; run python -m "
          f"qaconv_jax.data.prepare --dataset {dataset} --manual-dir DIR --data-dir {data_dir}")
    self.source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    meta = [self.source[i] for i in range(len(self.source))]
    self.pids = np.array([m["pid"] for m in meta], np.int64)
    self.cameras = np.array([m["camera"] for m in meta], np.int64)
    self.times = np.array([m["time"] for m in meta], np.float64)
    self.names = [_text(m["filename"]) for m in meta]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    ex = self.source[i]
    return {"image": ex["image"], "pid": int(ex["pid"]), "camera": int(ex["camera"]),
            "time": float(ex["time"]), "where": _text(ex["filename"])}


def _text(value) -> str:
  """A TFDS Text feature as str (the data source hands back bytes)."""
  return value.decode() if isinstance(value, bytes) else value
