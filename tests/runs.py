"""Helpers of the training tests: configs with overrides, and a checkpoint's leaves."""

import os
import subprocess
import sys

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(devices: int | None = None) -> dict:
  """The environment of a command-line subprocess: CPU, the suite's persistent compilation
  cache (conftest.py), and with ``devices`` that many simulated CPU devices."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".cache", "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_python(*args: str) -> subprocess.CompletedProcess:
  """``python args`` (a script and its flags) from the repository root, `cli_env`, output
  captured."""
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
  )


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  """``python -m module args`` (`run_python`)."""
  return run_python("-m", module, *args)


def save_untrained_checkpoint(cfg, workdir, step=7, seed=0, model_overrides=None) -> None:
  """A freshly initialised train state of ``cfg``'s model saved as ``workdir``'s checkpoint
  ``step`` (5 classes); ``model_overrides``: settings recorded in its meta instead."""
  from qaconv_jax.models.model import build_model
  from qaconv_jax.optim import make_optimizer
  from qaconv_jax.train_state import create_train_state

  state = create_train_state(
    build_model(cfg.model),
    make_optimizer(cfg.optim, 10),
    jax.random.key(seed),
    tuple(cfg.data.image_size),
    5,
    cfg.loss,
  )
  model_cfg = {**cfg.model.to_dict(), **(model_overrides or {})}
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, step, state, {"model": model_cfg, "num_classes": 5})
  mngr.wait_until_finished()
  mngr.close()
