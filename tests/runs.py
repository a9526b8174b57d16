"""Helpers of the training tests: configs with overrides, and a checkpoint's leaves."""

import jax
import numpy as np

from qaconv_jax import checkpoint


def tiny_run_config(get_config, **overrides):
  """``get_config("tiny")`` without test sets (evaluation has its own tests), with dotted
  ``overrides`` (``**{"optim.lr": 0.1}``)."""
  cfg = get_config("tiny")
  cfg.eval.testsets = ""
  for k, v in overrides.items():
    target = cfg
    *parts, last = k.split(".")
    for part in parts:
      target = target[part]
    target[last] = v
  return cfg


def checkpoint_leaves(workdir):
  """``(step, {key path: array})`` of ``workdir``'s latest checkpoint."""
  step, state = checkpoint.restore_latest(workdir)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
