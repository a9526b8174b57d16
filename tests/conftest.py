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
