"""Class memory writes, and that a step reads the memory as it was before the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.losses import focal_memory_loss
from qaconv_jax.memory import init_class_memory, update_class_memory
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import check_finite, train_step
from tests.conftest import random_unit_maps


def test_update_replaces_rows_last_duplicate_wins(rng):
  memory, valid = init_class_memory(6, (2, 1, 3), all_valid=False)
  features = jnp.asarray(rng.normal(size=(4, 2, 1, 3)), jnp.float32)
  labels = jnp.array([4, 1, 4, 0])
  new_memory, new_valid = jax.jit(update_class_memory)(memory, valid, features, labels)
  np.testing.assert_array_equal(np.asarray(new_memory[4]), np.asarray(features[2]))
  np.testing.assert_array_equal(np.asarray(new_memory[1]), np.asarray(features[1]))
  np.testing.assert_array_equal(np.asarray(new_memory[0]), np.asarray(features[3]))
  np.testing.assert_array_equal(np.asarray(new_memory)[[2, 3, 5]], 0.0)
  np.testing.assert_array_equal(np.asarray(new_valid), [True, True, False, False, True, False])


def test_init_all_valid_is_v1_0():
  _, valid = init_class_memory(3, (1, 1, 2), all_valid=True)
  assert np.asarray(valid).all()


def test_update_shape_error():
  memory, valid = init_class_memory(3, (2, 1, 4), all_valid=False)
  with pytest.raises(ValueError, match="class memory"):
    update_class_memory(memory, valid, jnp.zeros((2, 2, 1, 5)), jnp.array([0, 1]))


@pytest.fixture(scope="module")
def tiny_state(tiny_config):
  model = build_model(tiny_config.model)
  tx = make_optimizer(tiny_config.optim, steps_per_epoch=10)
  return model, create_train_state(
    model, tx, jax.random.key(0), tuple(tiny_config.data.image_size), 8, tiny_config.loss
  )


def test_step_reads_memory_before_writing(tiny_state, tiny_data, rng):
  model, state = tiny_state
  images, labels = tiny_data
  h, w, d = state.class_memory.shape[1:]
  old_memory = jnp.asarray(random_unit_maps(rng, 8, h, w, d))
  state = state.replace(class_memory=old_memory)
  idx = np.array([0, 9, 18, 27, 8, 17])  # labels 0, 1, 2, 3, 1, 2
  batch = {
    "image": jnp.asarray(images[idx], jnp.float32) / 255.0,
    "label": jnp.asarray(labels[idx]),
  }
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def loss_against(memory):
    (feats, logits), _ = model.apply(
      variables, batch["image"], memory=memory, train=True, mutable=["batch_stats"]
    )
    return feats, float(
      jnp.mean(focal_memory_loss(logits, batch["label"], state.memory_valid, 2.0))
    )

  feats, loss_old = loss_against(old_memory)
  new_state, metrics = jax.jit(lambda s, b, r: train_step(s, b, r, gamma=2.0))(
    state, batch, jax.random.key(0)
  )
  check_finite(metrics, 0)
  np.testing.assert_allclose(float(metrics["loss"]), loss_old, rtol=1e-5)
  mem = np.asarray(new_state.class_memory)
  # Rows of the batch's classes hold this batch's features (the later duplicate wins) ...
  # (atol: the jitted step and the eager forward round differently; another image's features
  # differ by ~0.1)
  for row, label in ((0, 0), (4, 1), (5, 2), (3, 3)):
    np.testing.assert_allclose(mem[label], np.asarray(feats[row]), atol=1e-5)
  # ... and the rest is untouched.
  np.testing.assert_array_equal(mem[4:], np.asarray(old_memory[4:]))
  # The check has teeth: the loss against the written memory is different.
  _, loss_new = loss_against(new_state.class_memory)
  assert abs(loss_new - loss_old) > 1e-3


def test_check_finite_names_the_metric():
  check_finite({"loss": 1.0}, 3)
  with pytest.raises(FloatingPointError, match=r"step 7.*'loss': nan"):
    check_finite({"loss": float("nan"), "accuracy": 0.5}, 7)
