"""A trained model ready to embed and match: its config, weights and identity.

The config comes from ``--config`` (a config file, ``path[:variant]``) or, by default, the
``config.json`` that train.py writes into its workdir. The weights are the workdir's latest
(or a given) checkpoint, refused when they were written for another model. The identity
(`fingerprint`) is a hash of everything that fixes a feature map: the model settings that
are not runtime knobs, the input size and every weight. An index records it, so it is never
searched with maps of another model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np

from qaconv_jax import checkpoint, sharding
from qaconv_jax.config_checks import eval_problems, runtime_problems
from qaconv_jax.errors import ConfigError, MissingFile
from qaconv_jax.evaluation.eval_lib import lists_fn, model_fns
from qaconv_jax.models.model import RUNTIME_KEYS, QAConvModel, build_model


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``"configs/default.py:tiny"`` -> that file's ``get_config("tiny")`` (no variant: None);
  a ``.json`` file (train.py's ``config.json``) -> its values."""
  path, _, arg = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
  if not os.path.isfile(path):
    raise MissingFile(f"no config file {path} (expected a .py config, optionally :variant).")
  if path.endswith(".json"):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  module_spec = importlib.util.spec_from_file_location("_qaconv_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg).")
  return module.get_config(arg or None)


def workdir_config(workdir: str, spec: str | None = None) -> ml_collections.ConfigDict:
  """``spec``'s config, or the ``config.json`` train.py left in ``workdir``."""
  if spec:
    return load_config_file(spec)
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise MissingFile(
      f"no --config given and {path} does not exist (train.py writes it; a converted "
      "checkpoint has none): pass --config CONFIG_FILE[:variant]."
    )
  return load_config_file(path)


def fingerprint(model_cfg: dict, image_size, variables: dict) -> str:
  """sha256 hex of the weight-defining model settings, the input size and every weight
  (path, dtype, shape and bytes): equal exactly when two models give the same maps."""
  h = hashlib.sha256()
  settings = {k: v for k, v in sorted(model_cfg.items()) if k not in RUNTIME_KEYS}
  h.update(json.dumps([settings, list(image_size)], sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class TrainedModel:
  """A restored model under its evaluation numerics (``config.eval.dtype``)."""

  config: ml_collections.ConfigDict
  model: QAConvModel
  variables: dict  # replicated on ``mesh``
  step: int
  workdir: str
  fingerprint: str
  mesh: jax.sharding.Mesh

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.config.data.image_size)

  @property
  def distance(self) -> str:
    return self.config.eval.get("distance", "sigmoid")

  @functools.cached_property
  def _fns(self):
    embed, match = model_fns(self.model, self.variables)
    return embed, match, lists_fn(self.model, self.variables)

  @property
  def embed(self):
    """``images [n, H, W, 3] in [0, 1] -> maps [n, h, w, d]``, jitted."""
    return self._fns[0]

  @property
  def match(self):
    """``(probe [p, h, w, d], gallery [g, h, w, d]) -> logits [p, g]``, jitted."""
    return self._fns[1]

  @property
  def match_lists(self):
    """``(anchor [B,h,w,d], cands [B,K,h,w,d], anchor_is_probe [B,K]) -> logits [B, K]``."""
    return self._fns[2]

  def describe(self) -> dict:
    """What an index or an export records of the model."""
    return {
      "fingerprint": self.fingerprint,
      "workdir": os.path.abspath(self.workdir),
      "step": int(self.step),
      "model": self.config.model.to_dict(),
      "image_size": list(self.image_size),
      "distance": self.distance,
      "numerics": self.config.eval.dtype,
    }


def load_trained(
  workdir: str, config_spec: str | None = None, step: int | None = None, mesh=None
) -> TrainedModel:
  """Restores ``workdir``'s model (see the module docstring for where its config comes from)."""
  config = workdir_config(workdir, config_spec)
  eval_cfg = config.eval.copy_and_resolve_references()
  eval_cfg.testsets = ""  # no test set is read here: their data need not exist
  problems = runtime_problems(config.model) + eval_problems(eval_cfg)
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems) + ".")
  step, variables = checkpoint.restore_variables(config, workdir, step)
  # Host arrays: the restored ones sit on one local device, which a multi-process mesh
  # cannot take them from.
  variables = jax.tree.map(np.asarray, variables)
  mesh = mesh or sharding.make_mesh()
  model = build_model(config.model, numerics=config.eval.dtype)
  fp = fingerprint(config.model.to_dict(), config.data.image_size, variables)
  return TrainedModel(config, model, sharding.replicate(variables, mesh), step, workdir, fp, mesh)
