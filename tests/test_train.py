"""A tiny model learns the synthetic identities through the jitted class-memory step."""

import jax
import jax.numpy as jnp
import numpy as np

from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import check_finite, make_train_step


def test_tiny_model_learns_identities(tiny_config, tiny_data):
  images, labels = tiny_data
  num_ids, per_id = 8, 8
  model = build_model(tiny_config.model)
  tx = make_optimizer(tiny_config.optim, steps_per_epoch=1000)
  state = create_train_state(
    model, tx, jax.random.key(0), tuple(tiny_config.data.image_size), num_ids, tiny_config.loss
  )
  step = make_train_step(tiny_config.loss)
  sampler = np.random.default_rng(0)
  history = []
  for i in range(50):
    # P x K = 8 ids x 2 images
    idx = np.concatenate(
      [sampler.choice(per_id, 2, replace=False) + c * per_id for c in range(num_ids)]
    )
    batch = {
      "image": jnp.asarray(images[idx], jnp.float32) / 255.0,
      "label": jnp.asarray(labels[idx]),
    }
    state, metrics = step(state, batch, jax.random.key(1))
    check_finite(metrics, i)
    history.append({k: float(v) for k, v in metrics.items()})
  loss = np.array([h["loss"] for h in history])
  acc = np.array([h["accuracy"] for h in history])
  # Without learning (lr = 0) accuracy stays near 0.3 and the loss near 2.2 on this data.
  assert acc[:5].mean() <= 0.4, acc[:5]
  assert acc[-10:].mean() >= 0.8, acc[-10:]
  assert loss[-10:].mean() <= 0.35 * loss[:5].mean(), (loss[:5], loss[-10:])
  assert int(state.step) == 50 and bool(state.memory_valid.all())
