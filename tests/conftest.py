"""Shared fixtures. The persistent compilation cache makes re-runs of the suite cheap."""

import os
import pathlib

import jax
import numpy as np
import pytest

# The suite runs on CPU (CI has no accelerator) even where JAX would pick a GPU; set
# QAJ_TEST_PLATFORM=cuda (or tpu) to run it there. Tolerances that depend on the backend
# come from `tolerance`: float32 sums run in another order on an accelerator.
PLATFORM = os.environ.get("QAJ_TEST_PLATFORM", "cpu")
jax.config.update("jax_platforms", PLATFORM)
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", os.fspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def tolerance(cpu: float, accelerator: float) -> float:
  """An absolute tolerance for the platform the suite runs on."""
  return cpu if PLATFORM == "cpu" else accelerator


def random_unit_maps(rng: np.random.Generator, n: int, h: int, w: int, d: int) -> np.ndarray:
  """``[n, h, w, d]`` float32 maps of unit length over ``d``."""
  x = rng.normal(size=(n, h, w, d))
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_config():
  from configs.default import get_config

  return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
  """8 synthetic identities x 8 images at the tiny image size."""
  from qaconv_jax.data.synthetic import make_identity_set

  return make_identity_set(8, 8, seed=0, size=tuple(tiny_config.data.image_size))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A tiny model trained by train.py (2 steps on synthetic domain a) and the synthetic_b
  test tree it is evaluated on: ``{"workdir", "root"}`` (root: a Market-1501 layout)."""
  import subprocess
  import sys

  from configs.default import get_config
  from qaconv_jax.data.pipeline import materialize_synthetic

  workdir = str(tmp_path_factory.mktemp("trained"))
  root_dir = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "configs/default.py:tiny",
      "--workdir",
      workdir,
      "--config.max_steps=2",
      "--config.eval.testsets=",
    ],
    cwd=root_dir,
    env={**os.environ, "JAX_PLATFORMS": PLATFORM},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  source = get_config("tiny").eval.sources.synthetic_b
  root = materialize_synthetic(source, os.path.join(workdir, "data")).root
  return {"workdir": workdir, "root": root}
