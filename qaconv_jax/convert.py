"""PyTorch weights -> qaconv-jax checkpoints.

    python -m qaconv_jax.convert --from FILE --to DIR [--image_size 384,128]

Reads
  - an ImageNet backbone state_dict: torchvision ResNet-18..152, or IBN-Net-a / -b
    (``resnet50_ibn_a-d9d0bb7b.pth`` ...);
  - an official QAConv checkpoint (``checkpoint.pth.tar``: ``model`` = the ``resmap`` network
    with its ``base`` ResNet and neck; ``criterion`` = the v1.x ``QAConvLoss`` or the v2.x
    ``ClassMemoryLoss`` / ``PairwiseMatchingLoss`` with its ``matcher``; the class memory
    where present), or such a ``model`` state_dict alone;
  - any of these saved as ``.npz`` (section keys ``model/<key>``), which needs no torch.
Writes ``DIR/checkpoints/0/`` in the layout of a training workdir: ``config.init_from=DIR``
starts training from it and ``eval.py --workdir DIR`` evaluates a complete model.

The architecture (depth, width, IBN type, neck, head) is read off the keys and shapes.
Every tensor of the model is looked up by its PyTorch name (`torch_name`); a missing,
mis-shaped or unknown key fails the conversion, naming the key. Entries that are known and
deliberately not converted (layer4 and the ImageNet classifier, which a stride-16 QAConv
never runs; ``num_batches_tracked``; the optimiser state) are listed in the report.
``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and containers
only, never arbitrary pickled objects. torch is an optional extra: ``pip install .[torch]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qaconv_jax import checkpoint
from qaconv_jax.errors import OutputExists
from qaconv_jax.models.model import QAConvModel
from qaconv_jax.models.resnet import ARCHS, ResNet, torchvision_key
from qaconv_jax.torch_files import ConversionError, read_state_dict

__all__ = [
  "Conversion",
  "ConversionError",
  "convert",
  "read_state_dict",
  "torch_name",
  "write",
  "main",
]

STRIDE = 16  # QAConv's maps come from layer3


@dataclasses.dataclass
class Conversion:
  """What a PyTorch file converts to.

  ``model``: the architecture found (``config.model`` fields: depth, width, ibn, and for a
  QAConv checkpoint neck_dim, neck_version, head). ``variables``: ``{"params",
  "batch_stats"}`` nested dicts of float32 arrays. ``class_memory [C, h, w, d]`` and
  ``memory_valid [C]`` when the file has a class memory. ``report``: one line per decision.
  """

  kind: str
  model: dict
  variables: dict
  class_memory: np.ndarray | None = None
  memory_valid: np.ndarray | None = None
  image_size: tuple[int, int] | None = None
  report: list[str] = dataclasses.field(default_factory=list)


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


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of one of our variables (the inverse of `_to_flax`)."""
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]  # Dense [in, out] -> Linear [out, in]
  return (1,) if shape == () else shape  # BatchNorm1d(1) holds [1]; ours are scalars


def _to_flax(leaf: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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


def _map_size(flat, layout: Layout, image_size: tuple[int, int]) -> tuple[int, int]:
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
  h, w = _map_size(flat, layout, image_size)
  fc = flat[f"{layout.head}fc.weight"]
  model["head"] = {2 * h * w: "v1", h * w: "v2"}.get(int(fc.shape[-1]))
  if model["head"] is None:
    raise ConversionError(
      f"'{layout.head}fc.weight' has {fc.shape[-1]} inputs, but a {h}x{w} map needs "
      f"{2 * h * w} (v1 head) or {h * w} (v2 head); give the training --image_size."
    )
  return model


def _template(model: dict, map_hw: tuple[int, int]) -> dict:
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


# ----------------------------------------------------------------------------- conversion
def convert(
  flat: Mapping[str, np.ndarray],
  image_size: tuple[int, int] = (384, 128),
  notes: list[str] | None = None,
) -> Conversion:
  """Converts a flat PyTorch state (see `read_state_dict`) to our variables.

  ``image_size`` (H, W) fixes the map size, and so the v1/v2 head's input width, when the
  file has no class memory to read it from. Raises `ConversionError` listing every
  missing, mis-shaped and unknown key.
  """
  flat = _strip_data_parallel(dict(flat))
  kind, layout = detect_layout(flat)
  model = infer_model(flat, layout, image_size)
  map_hw = _map_size(flat, layout, image_size)
  template = _template(model, map_hw)

  used, missing, misshaped, variables = set(), [], [], {}
  for collection, tree in template.items():
    out = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      name = torch_name(collection, path, layout)
      want = _torch_shape(path[-1], spec.shape)
      if name not in flat:
        missing.append(f"{name} {list(want)}")
        continue
      used.add(name)
      if tuple(flat[name].shape) != want:
        misshaped.append(f"{name}: file {list(flat[name].shape)}, model {list(want)}")
        continue
      out[path] = _to_flax(path[-1], flat[name], spec.shape)
    variables[collection] = traverse_util.unflatten_dict(out) if out else {}

  conv = Conversion(kind, model, variables, report=list(notes or []))
  if layout.memory:
    _convert_memory(flat, layout, model, map_hw, conv, used, misshaped)
  conv.image_size = (map_hw[0] * STRIDE, map_hw[1] * STRIDE)
  unexpected = _classify_leftovers(flat, used, layout, conv.report)
  if missing or misshaped or unexpected:
    parts = [
      f"{title} ({len(keys)}): " + "; ".join(keys)
      for title, keys in (
        ("missing", missing),
        ("mis-shaped", misshaped),
        ("unexpected", unexpected),
      )
      if keys
    ]
    raise ConversionError(f"the {kind} does not fit a {_describe(model)}: " + " | ".join(parts))
  n = sum(v.size for c in variables.values() for v in traverse_util.flatten_dict(c).values())
  conv.report.insert(
    0, f"converted {len(used)} tensors ({n:,} values) from the {kind}: {_describe(model)}"
  )
  return conv


def _strip_data_parallel(flat: dict) -> dict:
  """``nn.DataParallel`` state_dicts prefix every key with ``module.``; drop it."""

  def strip(k):
    head, sep, tail = k.rpartition("/")
    return head + sep + tail[len("module.") :] if tail.startswith("module.") else k

  return {strip(k): v for k, v in flat.items()}


def _convert_memory(flat, layout, model, map_hw, conv, used, misshaped) -> None:
  name = f"{layout.memory}class_memory"
  memory = flat[name]
  used.add(name)
  want = (model["neck_dim"], *map_hw)
  if memory.ndim != 4 or tuple(memory.shape[1:]) != want:
    misshaped.append(f"{name}: file {list(memory.shape)}, model [C, {', '.join(map(str, want))}]")
    return
  conv.class_memory = np.ascontiguousarray(memory.transpose(0, 2, 3, 1), np.float32)  # NHWC
  valid = flat.get(f"{layout.memory}valid_class")
  if valid is None:  # v1.0 had no flags: every class counts from the start
    conv.memory_valid = np.ones(memory.shape[0], bool)
    conv.report.append("no valid_class (v1.0): every memory class marked valid")
  else:
    used.add(f"{layout.memory}valid_class")
    conv.memory_valid = np.asarray(valid).reshape(-1) > 0.5
    conv.report.append(
      f"class memory: {memory.shape[0]} classes, {int(conv.memory_valid.sum())} valid"
    )


_UNUSED_STAGE4 = "layer4 and the ImageNet classifier fc (unused: QAConv stops at layer3)"
_COUNTERS = "num_batches_tracked (BN step counters)"


def _classify_leftovers(flat, used, layout: Layout, report: list[str]) -> list[str]:
  """Keys not converted: the known-unused ones go to ``report``; the rest are returned."""
  skipped = {_COUNTERS: 0, _UNUSED_STAGE4: 0}
  unexpected = []
  stage4 = re.compile(rf"{re.escape(layout.backbone)}(layer4\.|fc\.)")
  for k in sorted(set(flat) - used):
    if k.endswith("num_batches_tracked"):
      skipped[_COUNTERS] += 1
    elif stage4.match(k):
      skipped[_UNUSED_STAGE4] += 1
    elif k == "epoch":
      report.append(f"trained for {int(flat[k])} epochs")
    else:
      unexpected.append(f"{k} {list(flat[k].shape)}")
  report.extend(f"not converted: {n} tensors of {why}" for why, n in skipped.items() if n)
  return unexpected


def _describe(model: dict) -> str:
  net = f"ResNet-{model['depth']}" + (f"-IBN-{model['ibn']}" if model["ibn"] else "")
  net += f" (width {model['width']})" if model["width"] != 64 else ""
  if "neck_dim" in model:
    net += f", neck {model['neck_version']} d={model['neck_dim']}"
  if "head" in model:
    net += f", head {model['head']}"
  return net


# ----------------------------------------------------------------------------- writing
def write(conv: Conversion, out_dir: str, source: str) -> str:
  """Writes ``conv`` as ``out_dir/checkpoints/0`` (the layout `checkpoint.restore_latest`
  and ``config.init_from`` read). Refuses a folder that already holds checkpoints."""
  if os.path.isdir(checkpoint.checkpoint_dir(out_dir)) and os.listdir(
    checkpoint.checkpoint_dir(out_dir)
  ):
    raise OutputExists(
      f"{checkpoint.checkpoint_dir(out_dir)} already holds checkpoints; "
      "convert into an empty folder."
    )
  state = dict(conv.variables)
  meta = {
    "model": conv.model,
    "converted_from": os.path.abspath(source),
    "kind": conv.kind,
    "image_size": list(conv.image_size),
    "report": conv.report,
  }
  if conv.class_memory is not None:
    state.update(class_memory=conv.class_memory, memory_valid=conv.memory_valid)
    meta["num_classes"] = int(conv.class_memory.shape[0])
  mngr = checkpoint.manager(out_dir, max_to_keep=None)
  try:
    checkpoint.save(mngr, 0, state, meta)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return checkpoint.checkpoint_dir(out_dir)


def main(argv: list[str] | None = None) -> Conversion:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--from",
    dest="source",
    required=True,
    help="a .pth / .pth.tar (needs torch) or .npz state_dict or checkpoint",
  )
  ap.add_argument("--to", dest="out_dir", required=True, help="output folder (empty)")
  ap.add_argument(
    "--image_size",
    default="384,128",
    help="H,W the checkpoint was trained at; only read when the file has no "
    "class memory and a QAConv head (it fixes the head's input width)",
  )
  args = ap.parse_args(argv)
  try:
    image_size = tuple(int(v) for v in args.image_size.split(","))
    assert len(image_size) == 2
  except (ValueError, AssertionError):
    ap.error(f"--image_size must be H,W (e.g. 384,128), got {args.image_size!r}")
  flat, notes = read_state_dict(args.source)
  conv = convert(flat, image_size, notes)
  where = write(conv, args.out_dir, args.source)
  print("\n".join(conv.report + [f"wrote {where}/0"]))
  settings = " ".join(
    f"--config.model.{k}={v!r}" if isinstance(v, str) else f"--config.model.{k}={v}"
    for k, v in conv.model.items()
  )
  if "head" in conv.model:
    print(f"evaluate: python eval.py --config CONFIG --workdir {args.out_dir} {settings}")
  print(
    f"train from it: python train.py --config CONFIG --workdir WORKDIR "
    f"--config.init_from={args.out_dir} {settings}"
  )
  return conv


if __name__ == "__main__":
  from qaconv_jax import cli

  cli.run_plain(main)
