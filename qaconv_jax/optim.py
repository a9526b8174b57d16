"""Optimiser: PyTorch-style SGD with per-group learning rates (docs/method.md §4, §12).

PyTorch's ``SGD(weight_decay=wd, momentum=m, nesterov=True)`` adds ``wd * param`` to the
gradient before the momentum buffer, and its learning rate scales the final update, not the
buffer. ``add_decayed_weights -> trace(nesterov) -> scale_by_learning_rate`` is that, step
for step. The backbone gets a fraction of the new layers' rate via path regexes.

QAConv 2.1 adds gradient clipping per parameter group (before the weight decay, as
``clip_grad_norm_`` runs before ``optimizer.step()``) and the adaptive schedule: the
epoch-mean loss of the 2nd epoch is the base; the first later epoch whose mean loss falls
below ``step_factor`` x base multiplies every rate by ``decay_factor`` and ends training
half as many epochs later (`adaptive_schedule`). Its state lives in the optimiser state,
so checkpoints carry it and a resumed run continues it exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
  if cfg.schedule in ("constant", "plateau", "adaptive"):
    return optax.constant_schedule(cfg.lr)
  if cfg.schedule == "step":
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    return optax.piecewise_constant_schedule(cfg.lr, boundaries)
  raise ConfigError(
    f"optim.schedule must be 'step', 'constant', 'plateau' or 'adaptive', got {cfg.schedule!r}."
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


def clip_by_group_norm(max_norm: float, groups: tuple[str, ...]) -> optax.GradientTransformation:
  """Clips the gradient of each parameter group to global norm ``max_norm``, separately.

  ``groups``: path regexes (e.g. ``"^(backbone|neck)/"``, ``"^qaconv/"``); every parameter
  must match one (the first it matches counts). PyTorch's ``clip_grad_norm_`` rule: scale =
  ``min(1, max_norm / (norm + 1e-6))``, the norm over the group's gradients in float32.
  """
  patterns = {rx: None for rx in groups}

  def labels_of(tree):
    labels = group_labels(tree, patterns)
    if "default" in jax.tree.leaves(labels):
      unmatched = [
        param_path(p)
        for p, label in jax.tree_util.tree_leaves_with_path(labels)
        if label == "default"
      ]
      raise ConfigError(
        f"optim.clip_groups {list(groups)} do not cover every parameter: {unmatched[:3]} "
        f"({len(unmatched)} in all) match none of them."
      )
    return labels

  def init(params):
    labels_of(params)  # fails at init, before any step
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    labels = labels_of(updates)
    scales = {}
    for rx in groups:
      leaves = [
        u for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)) if label == rx
      ]
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves))
      scales[rx] = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    clipped = jax.tree.map(lambda u, label: (u * scales[label]).astype(u.dtype), updates, labels)
    return clipped, state

  return optax.GradientTransformation(init, update)


class AdaptiveState(NamedTuple):
  """`adaptive_schedule`'s state (all scalars, checkpointed with the optimiser)."""

  count: jax.Array  # steps taken
  loss_sum: jax.Array  # the current epoch's summed step losses
  base_loss: jax.Array  # the 2nd epoch's mean loss; NaN before it ends
  scale: jax.Array  # 1, or decay_factor once stepped
  final_epoch: jax.Array  # the epoch training ends after: max_epochs until stepped


def adaptive_schedule(
  steps_per_epoch: int, max_epochs: int, step_factor: float, decay_factor: float
) -> optax.GradientTransformationExtraArgs:
  """QAConv 2.1's adaptive schedule (the authors' ``main.py``) as an optax transform that
  scales the updates; the train step passes each step's loss as ``value``.

  After epoch ``e`` (1-based) ends, with ``mean`` its mean step loss: ``e == 2`` sets the
  base to ``mean``; then, once only, ``mean < step_factor * base`` multiplies every rate by
  ``decay_factor`` from the next step on and sets ``final_epoch = min(max_epochs, e + e //
  2)``. The training loop stops after ``final_epoch`` (`final_epoch`).
  """

  def init(params):
    del params
    return AdaptiveState(
      count=jnp.zeros([], jnp.int32),
      loss_sum=jnp.zeros([], jnp.float32),
      base_loss=jnp.full([], jnp.nan, jnp.float32),
      scale=jnp.ones([], jnp.float32),
      final_epoch=jnp.full([], max_epochs, jnp.int32),
    )

  def update(updates, state, params=None, *, value, **extra):
    del params, extra
    # This step still runs at the current rate: the decision is taken after the epoch.
    updates = jax.tree.map(lambda u: (u * state.scale).astype(u.dtype), updates)
    count = state.count + 1
    loss_sum = state.loss_sum + jnp.asarray(value, jnp.float32)
    epoch_end = count % steps_per_epoch == 0
    epoch = count // steps_per_epoch  # the epoch just finished, when epoch_end
    mean = loss_sum / steps_per_epoch
    base = jnp.where(epoch_end & (epoch == 2), mean, state.base_loss)
    stepped = state.scale != 1.0
    # NaN base (before epoch 2 ends) compares False: no step before there is a base.
    step_now = epoch_end & ~stepped & (epoch > 2) & (mean < step_factor * base)
    new = AdaptiveState(
      count=count,
      loss_sum=jnp.where(epoch_end, 0.0, loss_sum),
      base_loss=base,
      scale=jnp.where(step_now, jnp.float32(decay_factor), state.scale),
      final_epoch=jnp.where(
        step_now, jnp.minimum(max_epochs, epoch + epoch // 2), state.final_epoch
      ).astype(jnp.int32),
    )
    return updates, new

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int | None = None
) -> optax.GradientTransformation:
  """``config.optim`` -> SGD(momentum, nesterov, wd before momentum) with lr groups.

  ``cfg.lr_multipliers`` maps a path regex (e.g. ``"^backbone/"``) to a factor of the
  base rate (e.g. 0.1); unmatched parameters use the base rate. The scheduled base rate is
  an injected hyperparameter (``optax.inject_hyperparams``), so the state names it:
  `learning_rate` reads it back. ``cfg.clip_norm > 0`` clips each of ``cfg.clip_groups``
  first (`clip_by_group_norm`). ``schedule="adaptive"`` needs ``num_epochs`` (the most
  epochs training may run: ``config.num_epochs``).
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
  if cfg.clip_norm:
    tx = optax.chain(clip_by_group_norm(cfg.clip_norm, tuple(cfg.clip_groups)), tx)
  if cfg.schedule == "plateau":
    # The paper's ReduceLROnPlateau: x decay_factor when the epoch-mean training loss
    # (passed as `value` by the train step) has not improved for plateau_patience epochs.
    tx = optax.chain(
      tx,
      optax.contrib.reduce_on_plateau(
        factor=cfg.decay_factor, patience=cfg.plateau_patience, accumulation_size=steps_per_epoch
      ),
    )
  elif cfg.schedule == "adaptive":
    if not num_epochs:
      raise ConfigError("optim.schedule='adaptive' needs the most epochs (config.num_epochs).")
    tx = optax.chain(
      tx, adaptive_schedule(steps_per_epoch, num_epochs, cfg.step_factor, cfg.decay_factor)
    )
  return tx


def final_epoch(opt_state) -> int | None:
  """The epoch the adaptive schedule ends training after (None: no adaptive schedule)."""
  states = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaptiveState))
    if isinstance(s, AdaptiveState)
  ]
  return int(states[0].final_epoch) if states else None


def learning_rate(opt_state) -> float:
  """The new layers' learning rate of the last update (for logs): the injected
  ``learning_rate``, times the plateau option's or the adaptive schedule's ``scale`` when
  there is one (found by name in the state, not by its position in the chain). The adaptive
  schedule decides after an epoch's last update, so on that step this is already the rate
  of the next one."""

  def named(tuple_name):  # e.g. not the schedule's state also called learning_rate
    return lambda path, _: getattr(path[-1], "tuple_name", None) == tuple_name

  lr = float(optax.tree.get(opt_state, "learning_rate", filtering=lambda _, v: hasattr(v, "dtype")))
  for state_type in (optax.contrib.ReduceLROnPlateauState, AdaptiveState):
    scale = optax.tree.get(opt_state, "scale", default=None, filtering=named(state_type.__name__))
    if scale is not None:
      lr *= float(scale)
  return lr
