"""Exporting a trained model for serving (docs/method.md §14): `qaconv_jax.exported` reads it.

The embedding (images -> maps) and the matcher (query maps x gallery maps -> the distance
search ranks by) are lowered with `jax.export` to StableHLO for every asked platform, with
symbolic batch dimensions, their weights an argument kept beside them as plain arrays. The
matcher is exported untiled (``match_block=None``: tiles are a runtime knob of the live
model); the loader scores blocks of pairs that fit a memory budget instead.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from qaconv_jax import exported
from qaconv_jax.errors import ConfigError, OutputExists
from qaconv_jax.models.model import IMAGENET_MEAN, IMAGENET_STD, QAConvModel, build_model
from qaconv_jax.models.qaconv import logit_distance

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_DISTANCES = {
  "sigmoid": "1 - sigmoid(logit / 10) (the authors' v1.x and v2.1 tag)",
  "neg_logit": "-logit (the authors' master)",
}


def export_functions(trained, platforms=("cpu", "cuda")):
  """``(embed, distance, weights, map_shape)``: the two `jax.export.Exported` functions of
  ``trained`` (``embed(weights, images [n, H, W, 3])``, ``distance(weights, q [q, h, w, d],
  g [g, h, w, d])``), their flat list of weights and ``(h, w, d)``."""
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ConfigError(f"platforms {list(platforms)}: expected some of {list(PLATFORMS)}.")
  cfg = trained.config.model.copy_and_resolve_references()
  cfg.match_block, cfg.match_impl = None, "xla"
  model = build_model(cfg, numerics=trained.config.eval.dtype)
  host = jax.tree.map(np.asarray, trained.variables)
  weights, tree = jax.tree.flatten(host)
  specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  kind = trained.distance

  def embed(ws, images):
    v = jax.tree.unflatten(tree, ws)
    return model.apply(v, images, train=False, method=QAConvModel.embed)

  def distance(ws, q, g):
    v = jax.tree.unflatten(tree, ws)
    logits = model.apply(v, q, g, train=False, method=QAConvModel.match)  # [q, g]
    return logit_distance(logits, kind)

  height, width = trained.image_size
  (n,) = jax_export.symbolic_shape("n")
  image_spec = jax.ShapeDtypeStruct((n, height, width, 3), jnp.float32)
  map_shape = jax.eval_shape(embed, specs, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
  map_shape = tuple(map_shape.shape[1:])
  q, g = jax_export.symbolic_shape("q, g")
  lower = lambda fn, *args: jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
  e = lower(embed, specs, image_spec)
  d = lower(
    distance,
    specs,
    jax.ShapeDtypeStruct((q, *map_shape), jnp.float32),
    jax.ShapeDtypeStruct((g, *map_shape), jnp.float32),
  )
  return e, d, weights, map_shape


def export_model(trained, out: str, platforms=("cpu", "cuda"), overwrite: bool = False) -> dict:
  """Writes ``trained``'s export into the folder ``out`` and returns the ``model.json``
  written, plus ``"check"``: the export, loaded as a service loads it, against the live
  model on random images (``{"platform", "max_abs_diff"}``; None when this machine's platform
  is not among ``platforms``). The files are written and checked in a temporary folder,
  then renamed: ``out`` never holds a half or unchecked export. ``overwrite`` replaces an
  earlier export (only an export: another folder is refused)."""
  if os.path.exists(out):
    if not overwrite:
      raise OutputExists(f"{out} exists: choose another --out, or pass --overwrite.")
    if not os.path.isfile(os.path.join(out, exported.INFO_FILE)):
      raise OutputExists(f"{out} is not an export (no {exported.INFO_FILE}): not overwriting it.")
  embed, distance, weights, map_shape = export_functions(trained, platforms)
  cfg = trained.config
  norm = (
    f"imagenet: (x - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)}, inside embed"
    if cfg.model.input_norm == "imagenet"
    else "none: RGB in [0, 1] goes in as it is"
  )
  info = {
    "format": exported.FORMAT,
    **trained.describe(),
    "platforms": list(platforms),
    "input": {
      "height": trained.image_size[0],
      "width": trained.image_size[1],
      "layout": "NHWC",
      "dtype": "float32",
      "channels": "RGB",
      "range": [0.0, 1.0],
      "resize": "PIL bicubic to (height, width), as evaluation",
    },
    "normalization": norm,
    "maps": dict(zip("hwd", (int(s) for s in map_shape))),
    "distance_formula": _DISTANCES[trained.distance],
    "num_weights": len(weights),
    "jax_version": jax.__version__,
  }
  tmp, old = (f"{out.rstrip(os.sep)}.{kind}{os.getpid()}" for kind in ("tmp", "old"))
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, e in ((exported.EMBED_FILE, embed), (exported.DISTANCE_FILE, distance)):
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(e.serialize())
    arrays = {f"w{i:05d}": w for i, w in enumerate(weights)}
    np.savez(os.path.join(tmp, exported.WEIGHTS_FILE), **arrays)
    with open(os.path.join(tmp, exported.INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
    check = _check(trained, tmp) if jax_export.default_export_platform() in platforms else None
    _swap(tmp, out, old)
  except OSError as e:  # an output that cannot be written: a folder, permissions, space
    raise OutputExists(f"cannot write the export to {out}: {e}.") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {**info, "check": check}


def _swap(new: str, out: str, old: str) -> None:
  """``new`` renamed to ``out``; an earlier ``out`` is set aside as ``old`` meanwhile and
  put back if the rename fails, removed once it succeeded."""
  had = os.path.exists(out)
  if had:
    os.replace(out, old)
  try:
    os.replace(new, out)
  except OSError:
    if had:
      os.replace(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _check(trained, directory: str) -> dict:
  """The export in ``directory`` against the live model on 4 random images (a power of
  two: both run the same batch shape), maps and their distances. A difference beyond
  float32 rounding (1e-4; 5e-2 under reduced-precision ``eval.dtype``) is a bug."""
  tolerance = 1e-4 if trained.config.eval.dtype == "float32" else 5e-2
  served = exported.load(directory)
  images = np.random.default_rng(0).uniform(size=(4, *trained.image_size, 3)).astype(np.float32)
  maps = served.embed(images)
  live_maps = np.asarray(trained.embed(images))
  live_dist = np.asarray(logit_distance(trained.match(live_maps, live_maps), trained.distance))
  diff = max(
    float(np.abs(maps - live_maps).max()),
    float(np.abs(served.distance(maps, maps) - live_dist).max()),
  )
  if not diff <= tolerance:
    raise RuntimeError(f"the export differs from the live model by {diff:.3g} (a bug).")
  return {"platform": served.platform, "max_abs_diff": diff}
