"""Focal class-memory loss against a hand-written float64 reference (docs/method.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.losses import focal_memory_loss, memory_accuracy
from tests.reference import focal_loss_ref


def test_focal_loss_matches_reference_with_invalid_classes(rng):
  logits = rng.normal(scale=3.0, size=(6, 9)).astype(np.float32)
  labels = rng.integers(0, 9, size=6).astype(np.int32)
  valid = rng.random(9) < 0.6
  valid[labels] = True
  got = focal_memory_loss(logits, labels, valid)
  assert got.shape == (6,)
  np.testing.assert_allclose(np.asarray(got), focal_loss_ref(logits, labels, valid), rtol=1e-5)
  # Invalid classes contribute nothing whatever their logits.
  moved = logits.copy()
  moved[:, ~valid] += 100.0
  np.testing.assert_allclose(
    np.asarray(focal_memory_loss(moved, labels, valid)), np.asarray(got), rtol=1e-6
  )


def test_focal_loss_gamma_and_all_valid(rng):
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2], np.int32)
  valid = np.ones(5, bool)
  for gamma in (0.0, 1.0, 2.0):
    np.testing.assert_allclose(
      np.asarray(focal_memory_loss(logits, labels, valid, gamma)),
      focal_loss_ref(logits, labels, valid, gamma),
      rtol=1e-5,
    )


def test_focal_loss_gradient_includes_focal_weight(rng):
  # The focal weight is not stop-gradient: compare with central differences of the
  # float64 reference.
  logits = rng.normal(scale=2.0, size=(3, 4))
  labels = np.array([1, 3, 0])
  valid = np.array([True, True, False, True])
  grad = np.asarray(
    jax.grad(lambda z: focal_memory_loss(z, labels, valid).sum())(logits.astype(np.float32))
  )
  eps = 1e-5
  fd = np.zeros_like(logits)
  for i in range(3):
    for c in range(4):
      up, down = logits.copy(), logits.copy()
      up[i, c] += eps
      down[i, c] -= eps
      fd[i, c] = (
        focal_loss_ref(up, labels, valid).sum() - focal_loss_ref(down, labels, valid).sum()
      ) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-6)


def test_focal_loss_is_stable_for_large_logits():
  logits = jnp.array([[60.0, -60.0], [-60.0, 60.0]])
  loss = focal_memory_loss(logits, jnp.array([0, 0]), jnp.array([True, True]))
  assert np.all(np.isfinite(np.asarray(loss)))
  assert float(loss[0]) < 1e-20  # confidently right
  np.testing.assert_allclose(float(loss[1]), 2 * 60.0, rtol=1e-5)  # confidently wrong twice


def test_focal_loss_shape_errors():
  with pytest.raises(ValueError, match=r"logits \[b, C\], labels \[b\], valid \[C\]"):
    focal_memory_loss(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), jnp.ones(5, bool))


def test_memory_accuracy():
  logits = jnp.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
  assert float(memory_accuracy(logits, jnp.array([1, 0, 1, 2]))) == 0.5
