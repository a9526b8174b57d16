"""How PyTorch re-ID checkpoints are laid out: key layouts (torchvision / IBN-Net backbones,
the official QAConv ``model`` + ``criterion``), the PyTorch name and shape of each of our
variables, and the architecture read off the keys. Pure lookups; `qaconv_jax.convert` uses
them to convert a file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qaconv_jax.models.model import QAConvModel
from qaconv_jax.models.resnet import ARCHS, ResNet, output_channels, torchvision_key
from qaconv_jax.torch_files import ConversionError

STRIDE = 16  # QAConv's maps come from layer3


# ----------------------------------------------------------------------------- names
@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each part of the model lives in the flat dict (prefixes of PyTorch keys)."""

  backbone: str
  neck: str | None = None
  head: str | None = None
  memory: str | None = None


def detect_layout(flat: Mapping[str, np.ndarray]) -> tuple[str, Layout]:
  if any(k.startswith("model/") for k in flat):
    head = (
      "criterion/matcher."
      if any(k.startswith("criterion/matcher.") for k in flat)
      else "criterion/"
    )
    has_head = f"{head}fc.weight" in flat
    return "official QAConv checkpoint", Layout(
      "model/base.",
      "model/neck_",
      head if has_head else None,
      "criterion/" if "criterion/class_memory" in flat else None,
    )
  if "base.conv1.weight" in flat:
    return "official QAConv model state_dict", Layout("base.", "neck_")
  if "conv1.weight" in flat:
    return "ImageNet backbone", Layout("")
  raise ConversionError(
    "unrecognised state_dict: no 'conv1.weight' (torchvision / IBN-Net ResNet), "
    "'base.conv1.weight' (QAConv model) or 'model/...' sections (QAConv checkpoint); "
    f"first keys: {sorted(flat)[:6]}."
  )


def torch_name(collection: str, path: tuple[str, ...], layout: Layout) -> str:
  """Our variable ``collection/path`` -> its PyTorch key in the flat dict.

  ``("params", ("backbone", "layer1_0", "bn1", "IN", "scale"))`` -> ``"layer1.0.bn1.IN.weight"``
  (ImageNet file) or ``"model/base.layer1.0.bn1.IN.weight"`` (QAConv checkpoint);
  ``neck/conv/kernel`` -> ``model/neck_conv.weight``; ``qaconv/fc/kernel`` ->
  ``criterion/fc.weight`` (v1.x) or ``criterion/matcher.fc.weight`` (v2.x).
  """
  top, *rest = path
  prefix = {"backbone": layout.backbone, "neck": layout.neck, "qaconv": layout.head}[top]
  return prefix + torchvision_key(collection, rest)


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of one of our variables (the inverse of `to_flax`)."""
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]  # Dense [in, out] -> Linear [out, in]
  return (1,) if shape == () else shape  # BatchNorm1d(1) holds [1]; ours are scalars


def to_flax(leaf: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T
  # np.array, not ascontiguousarray: the latter makes 0-d arrays 1-d.
  return np.array(value.reshape(shape), dtype=np.float32, order="C")


# ----------------------------------------------------------------------------- architecture
def infer_backbone(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
  """depth, width and IBN type of the ResNet under ``prefix``, from its keys."""
  width = int(flat[f"{prefix}conv1.weight"].shape[0])
  counts = {}
  for k in flat:
    m = re.match(rf"{re.escape(prefix)}layer(\d)\.(\d+)\.", k)
    if m:
      stage, block = int(m.group(1)), int(m.group(2))
      counts[stage] = max(counts.get(stage, 0), block + 1)
  found = tuple(counts.get(s, 0) for s in (1, 2, 3))
  kind = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in flat else "basic"
  depths = [d for d, (k, c) in ARCHS.items() if k == kind and c[:3] == found]
  if not depths:
    raise ConversionError(
      f"{kind} blocks per stage {found} (layer1-3 under '{prefix}') match "
      f"no ResNet depth; known: "
      f"{ {d: c[:3] for d, (_, c) in ARCHS.items()} }."
    )
  ibn_a = f"{prefix}layer1.0.bn1.IN.weight" in flat
  ibn_b = any(re.match(rf"{re.escape(prefix)}layer[12]\.\d+\.IN\.weight$", k) for k in flat)
  if ibn_a and ibn_b:
    raise ConversionError("the backbone has both IBN-a (bn1.IN) and IBN-b (block IN) keys.")
  return {"depth": depths[0], "width": width, "ibn": "a" if ibn_a else "b" if ibn_b else ""}


def map_size(flat, layout: Layout, image_size: tuple[int, int]) -> tuple[int, int]:
  """(h, w) of the layer3 map: the class memory's when there is one, else the image's / 16."""
  if layout.memory:
    return tuple(int(s) for s in flat[f"{layout.memory}class_memory"].shape[2:])
  return image_size[0] // STRIDE, image_size[1] // STRIDE


def infer_model(flat, layout: Layout, image_size: tuple[int, int]) -> dict:
  model = infer_backbone(flat, layout.backbone)
  if layout.neck is None:
    return model
  conv = flat.get(f"{layout.neck}conv.weight")
  if conv is None:
    raise ConversionError(
      f"no '{layout.neck}conv.weight': checkpoints without a neck "
      "are not supported (QAConv's neck is part of every release)."
    )
  model["neck_dim"] = int(conv.shape[0])
  layer3 = output_channels(model["depth"], model["width"], "layer3")
  if int(conv.shape[1]) != layer3:
    raise ConversionError(
      f"'{layout.neck}conv.weight' takes {conv.shape[1]} channels, but this backbone's layer3 "
      f"gives {layer3}: a model trained with the authors' --final_layer other than layer3? "
      "The converter reads layer3 models only."
    )
  model["final_stage"] = "layer3"  # what the neck's input channels show
  if f"{layout.neck}bn.weight" in flat:
    model["neck_version"] = "v1"
  elif f"{layout.neck}conv.bias" in flat:
    model["neck_version"] = "v2.1"
  else:
    raise ConversionError(
      f"neither '{layout.neck}bn.*' (neck v1) nor '{layout.neck}conv.bias' (neck v2.1) is present."
    )
  if layout.head is None:
    return model
  h, w = map_size(flat, layout, image_size)
  fc = flat[f"{layout.head}fc.weight"]
  model["head"] = {2 * h * w: "v1", h * w: "v2"}.get(int(fc.shape[-1]))
  if model["head"] is None:
    raise ConversionError(
      f"'{layout.head}fc.weight' has {fc.shape[-1]} inputs, but a {h}x{w} map needs "
      f"{2 * h * w} (v1 head) or {h * w} (v2 head); give the training --image_size."
    )
  return model


def abstract_variables(model: dict, map_hw: tuple[int, int]) -> dict:
  """Shapes of our variables for ``model``: ``{"params", "batch_stats"}`` of ShapeDtypeStructs."""
  image = jnp.zeros((1, map_hw[0] * STRIDE, map_hw[1] * STRIDE, 3), jnp.float32)
  key = jax.random.key(0)
  if "neck_dim" not in model:
    net = ResNet(depth=model["depth"], width=model["width"], ibn=model["ibn"])
    shapes = jax.eval_shape(lambda: net.init(key, image, train=False))
    return {c: {"backbone": shapes[c]} for c in ("params", "batch_stats")}
  net = QAConvModel(
    depth=model["depth"],
    width=model["width"],
    ibn=model["ibn"],
    neck_dim=model["neck_dim"],
    neck_version=model["neck_version"],
    head=model.get("head", "v1"),
  )
  shapes = jax.eval_shape(lambda: net.init(key, image, train=False))
  if "head" not in model:  # a model state_dict alone: no matcher to convert
    return {c: {k: v for k, v in shapes[c].items() if k != "qaconv"} for c in shapes}
  return {c: dict(shapes[c]) for c in ("params", "batch_stats")}
