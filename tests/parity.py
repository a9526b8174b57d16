"""Our model run on the PyTorch parity fixtures (tools/make_parity_fixtures.py).

`outputs(case)` converts ``<case>.state.npz`` with `qaconv_jax.convert` and returns, for
every output PyTorch saved in ``<case>.io.npz``, ``(name, ours, torch's)`` in torch's
layout. Used by tests/test_convert.py and tools/parity_report.py (which prints the errors).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import traverse_util

from qaconv_jax.convert import Conversion, convert, read_state_dict
from qaconv_jax.losses import focal_memory_loss
from qaconv_jax.models.model import QAConvModel
from qaconv_jax.models.resnet import ResNet, torchvision_key

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "parity"
BACKBONES = ("resnet18_w4", "resnet50_ibn_a_w8", "resnet18_ibn_b_w8")
OFFICIAL = ("qaconv_v1_r18_w4", "qaconv_v2_r50_ibn_b_w4")


def load(case: str) -> tuple[dict, dict]:
  """``(flat state_dict, io arrays)`` of one fixture."""
  state, _ = read_state_dict(str(FIXTURES / f"{case}.state.npz"))
  with np.load(FIXTURES / f"{case}.io.npz") as z:
    return state, {k: z[k] for k in z.files}


def images(io: dict) -> np.ndarray:
  """``[N, H, W, 3]`` float32 in [0, 1], bit-identical to the torch side's input."""
  return io["input/images_u8"].astype(np.float32) / np.float32(255)


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _updated_stats(new_stats: dict, io: dict, prefix: str, head: str = "") -> list:
  """Our running statistics after a train-mode pass vs torch's ``after/<key>``."""
  rows = []
  for path, value in traverse_util.flatten_dict(new_stats).items():
    key = f"after/{head}{torchvision_key('batch_stats', path)}"
    rows.append((f"{prefix}{'/'.join(path)}", np.asarray(value).reshape(-1), io[key].reshape(-1)))
  return rows


def backbone_outputs(conv: Conversion, io: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
  net = ResNet(depth=conv.model["depth"], width=conv.model["width"], ibn=conv.model["ibn"])
  variables = {c: conv.variables[c]["backbone"] for c in ("params", "batch_stats")}
  x = images(io)
  stages = jax.jit(lambda v, x: net.apply(v, x, train=False, return_stages=True))(variables, x)
  rows = [(f"eval/{s}", nchw(stages[s]), io[f"torch/{s}"]) for s in ("layer1", "layer2", "layer3")]
  if "torch/train/layer3" in io:  # batch statistics, and the running-statistics update
    y, new = net.apply(variables, x, train=True, mutable=["batch_stats"])
    rows.append(("train/layer3", nchw(y), io["torch/train/layer3"]))
    rows += _updated_stats(new["batch_stats"], io, "after/")
  return rows


def official_outputs(conv: Conversion, io: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
  model = QAConvModel(**conv.model)
  variables = conv.variables
  x = images(io)
  features = jax.jit(lambda v, x: model.apply(v, x, train=False, method=QAConvModel.embed))(
    variables, x
  )  # [N, h, w, d]
  eval_logits = model.apply(variables, features, features, train=False, method=QAConvModel.match)
  train_logits, new = model.apply(
    variables,
    features,
    conv.class_memory,
    train=True,
    method=QAConvModel.match,
    mutable=["batch_stats"],
  )
  loss = focal_memory_loss(train_logits, io["input/targets"], conv.memory_valid)
  head = "matcher." if conv.model["head"] == "v2" else ""
  return [
    ("features", nchw(features), io["torch/features"]),
    ("eval_logits", np.asarray(eval_logits), io["torch/eval_logits"]),
    ("train_logits", np.asarray(train_logits), io["torch/train_logits"]),
    ("focal_loss", np.asarray(loss), io["torch/loss"]),
  ] + _updated_stats(new["batch_stats"]["qaconv"], io, "after/qaconv/", head)


def outputs(case: str) -> tuple[Conversion, dict, list[tuple[str, np.ndarray, np.ndarray]]]:
  state, io = load(case)
  conv = convert(state)
  rows = backbone_outputs(conv, io) if case in BACKBONES else official_outputs(conv, io)
  return conv, io, rows


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref|: the error relative to the tensor's scale."""
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
