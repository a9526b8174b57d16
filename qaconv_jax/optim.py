"""Optimiser: PyTorch-style SGD with per-group learning rates (docs/method.md §4).

PyTorch's ``SGD(weight_decay=wd, momentum=m, nesterov=True)`` adds ``wd * param`` to the
gradient before the momentum buffer, and its learning rate scales the final update, not the
buffer. ``add_decayed_weights -> trace(nesterov) -> scale_by_learning_rate`` is that, step
for step. The backbone gets a fraction of the new layers' rate via path regexes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from qaconv_jax.errors import ConfigError


def param_path(path) -> str:
  """``jax.tree_util`` key path -> ``"backbone/layer1_0/conv1/kernel"``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """``config.optim`` -> step -> base learning rate (of the new layers).

  ``schedule="step"``: ``lr`` multiplied by ``decay_factor`` at each epoch in
  ``decay_epochs`` (v1.0: x0.1 at epoch 40). ``"constant"``: ``lr`` throughout.
  ``"plateau"``: ``lr`` here; `make_optimizer` scales it down as the loss plateaus.
  """
  if cfg.schedule in ("constant", "plateau"):
    return optax.constant_schedule(cfg.lr)
  if cfg.schedule == "step":
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    return optax.piecewise_constant_schedule(cfg.lr, boundaries)
  raise ConfigError(
    f"optim.schedule must be 'step', 'constant' or 'plateau', got {cfg.schedule!r}."
  )


def group_labels(params: Any, multipliers: dict[str, float]) -> Any:
  """Labels every leaf with the first regex of ``multipliers`` its path matches, else
  ``"default"``."""
  patterns = [(re.compile(rx), rx) for rx in multipliers]

  def label(path, _):
    name = param_path(path)
    for pattern, rx in patterns:
      if pattern.search(name):
        return rx
    return "default"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """``config.optim`` -> SGD(momentum, nesterov, wd before momentum) with lr groups.

  ``cfg.lr_multipliers`` maps a path regex (e.g. ``"^backbone/"``) to a factor of the
  base rate (e.g. 0.1); unmatched parameters use the base rate. The scheduled base rate is
  an injected hyperparameter (``optax.inject_hyperparams``), so the state names it:
  `learning_rate` reads it back.
  """
  multipliers = dict(cfg.lr_multipliers)

  def sgd_groups(learning_rate):
    def sgd(factor: float) -> optax.GradientTransformation:
      return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
        optax.scale_by_learning_rate(factor * learning_rate),
      )

    transforms = {"default": sgd(1.0), **{rx: sgd(f) for rx, f in multipliers.items()}}
    return optax.multi_transform(transforms, lambda p: group_labels(p, multipliers))

  tx = optax.inject_hyperparams(sgd_groups)(learning_rate=lr_schedule(cfg, steps_per_epoch))
  if cfg.schedule == "plateau":
    # The paper's ReduceLROnPlateau: x decay_factor when the epoch-mean training loss
    # (passed as `value` by the train step) has not improved for plateau_patience epochs.
    tx = optax.chain(
      tx,
      optax.contrib.reduce_on_plateau(
        factor=cfg.decay_factor, patience=cfg.plateau_patience, accumulation_size=steps_per_epoch
      ),
    )
  return tx


def learning_rate(opt_state) -> float:
  """The new layers' learning rate of the last update (for logs): the injected
  ``learning_rate``, times the plateau option's ``scale`` when there is one (found by name
  in the state, not by its position in the chain)."""

  def named(tuple_name):  # e.g. not the schedule's state also called learning_rate
    return lambda path, _: getattr(path[-1], "tuple_name", None) == tuple_name

  lr = float(optax.tree.get(opt_state, "learning_rate", filtering=lambda _, v: hasattr(v, "dtype")))
  scale = optax.tree.get(
    opt_state, "scale", default=None, filtering=named(optax.contrib.ReduceLROnPlateauState.__name__)
  )
  return lr if scale is None else lr * float(scale)
