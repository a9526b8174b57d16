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

import numpy as np
from flax import traverse_util

from qaconv_jax import checkpoint
from qaconv_jax.errors import OutputExists
from qaconv_jax.torch_files import ConversionError, read_state_dict
from qaconv_jax.torch_layout import (
  STRIDE,
  Layout,
  abstract_variables,
  detect_layout,
  infer_model,
  map_size,
  to_flax,
  torch_name,
  torch_shape,
)

__all__ = [
  "Conversion",
  "ConversionError",
  "convert",
  "eval_distance_advice",
  "read_state_dict",
  "torch_name",
  "write",
  "main",
]


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
  map_hw = map_size(flat, layout, image_size)
  template = abstract_variables(model, map_hw)

  used, missing, misshaped, variables = set(), [], [], {}
  for collection, tree in template.items():
    out = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      name = torch_name(collection, path, layout)
      want = torch_shape(path[-1], spec.shape)
      if name not in flat:
        missing.append(f"{name} {list(want)}")
        continue
      used.add(name)
      if tuple(flat[name].shape) != want:
        misshaped.append(f"{name}: file {list(flat[name].shape)}, model {list(want)}")
        continue
      out[path] = to_flax(path[-1], flat[name], spec.shape)
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
  advice = eval_distance_advice(model)
  if advice:
    conv.report.append(advice)
  return conv


def eval_distance_advice(model: dict) -> str | None:
  """The ``config.eval.distance`` that reproduces the authors' numbers for ``model`` (None
  for a backbone alone). Only the v2 head exists in QAConv 2.1 (neck v2.1), and only the
  authors' master, since commit 1e50faa, evaluates with ``-logit``; v1.x, v2.0 and the v2.1
  tag use ``1 - sigmoid(logit / 10)`` (docs/method.md §5, §10)."""
  if "head" not in model:
    return None
  if model["head"] == "v2":
    return (
      "evaluation distance: a QAConv 2.1-style model (head v2, neck "
      f"{model.get('neck_version')}). To reproduce the +RR and +RR+TLift numbers of the "
      "authors' current code (master: distance -logit), evaluate with "
      "--config.eval.distance=neg_logit; the default --config.eval.distance=sigmoid "
      "(1 - sigmoid(logit/10)) reproduces the v2.1 tag and v1.x. Plain QAConv numbers are "
      "the same under both."
    )
  return (
    f"evaluation distance: a QAConv 1.x/2.0-style model (head {model['head']}): evaluate "
    "with --config.eval.distance=sigmoid (the default, 1 - sigmoid(logit/10)), as the "
    "authors' v1.x and v2.0 code does."
  )


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
