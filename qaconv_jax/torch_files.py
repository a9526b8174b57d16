"""Reading PyTorch weight files without trusting them.

``read_state_dict(path)`` turns a ``.pth`` / ``.pth.tar`` (read with
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled
objects; torch is the optional ``[torch]`` extra) or an ``.npz`` copy (no torch needed) into
one flat dict of NumPy arrays under their PyTorch names. Official QAConv checkpoints keep
their sections apart as ``model/<key>`` and ``criterion/<key>``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from qaconv_jax.errors import MissingExtra, MissingFile, QAConvError


class ConversionError(QAConvError, ValueError):
  """The file is not a state_dict this converter knows, or does not fit the model."""


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """``(flat, notes)``: every tensor of ``path`` as a NumPy array under its PyTorch name
  (official checkpoints: ``model/<key>``, ``criterion/<key>``), and notes on what was not
  an array (the optimiser state)."""
  if not os.path.isfile(path):
    raise MissingFile(f"no such file: {path}")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, []
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ConversionError(f"could not read {path} as .npz: {e}.") from None
  try:
    import torch
  except ImportError:
    raise MissingExtra(
      f"reading {path} needs PyTorch, an optional extra: "
      "pip install 'qaconv_jax[torch]' (or convert an .npz copy)."
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # an unpickling refusal or a corrupt file
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    refused = [ln.split(" was not")[0] for ln in lines if "Unsupported global" in ln]
    if refused:
      why = (
        f"it pickles a Python object ({refused[0].split('error: ')[-1]}); only tensors "
        "and plain containers are accepted, never arbitrary pickled objects"
      )
    elif any("Unsupported operand" in ln or "invalid load key" in ln for ln in lines):
      why = "the file is corrupt or not a PyTorch checkpoint"
    else:
      why = lines[0] if lines else type(e).__name__
    raise ConversionError(
      f"could not read {path} with torch.load(weights_only=True): {why}."
    ) from None
  return _flatten(obj, path)


def _array(t) -> np.ndarray:
  t = t.detach().cpu()
  return (t.float() if t.is_floating_point() else t).numpy()


def _is_tensor_dict(x) -> bool:
  return isinstance(x, Mapping) and bool(x) and all(hasattr(v, "detach") for v in x.values())


def _flatten(obj: Any, path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  if _is_tensor_dict(obj):
    return {k: _array(v) for k, v in obj.items()}, []
  if isinstance(obj, Mapping) and _is_tensor_dict(obj.get("model")):
    flat, notes = {}, []
    for top, value in obj.items():
      if top in ("model", "criterion") and _is_tensor_dict(value):
        flat.update({f"{top}/{k}": _array(v) for k, v in value.items()})
      elif top == "epoch":
        flat["epoch"] = np.asarray(value)
      elif top in ("optim", "optimizer"):
        notes.append(f"not converted: '{top}' (optimiser state; SGD momentum restarts)")
      else:
        notes.append(f"not converted: top-level entry '{top}' ({type(value).__name__})")
    return flat, notes
  if isinstance(obj, Mapping) and _is_tensor_dict(obj.get("state_dict")):
    notes = [f"not converted: top-level entry '{k}'" for k in obj if k != "state_dict"]
    return {k: _array(v) for k, v in obj["state_dict"].items()}, notes
  keys = list(obj)[:8] if isinstance(obj, Mapping) else []
  raise ConversionError(
    f"{path} holds a {type(obj).__name__} (keys {keys}); expected a state_dict of tensors, "
    "an official QAConv checkpoint with 'model' (and 'criterion'), or {'state_dict': ...}."
  )
