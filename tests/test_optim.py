"""The optimiser against PyTorch's SGD rule written out in NumPy (docs/method.md §4)."""

import jax
import ml_collections
import numpy as np
import pytest

from qaconv_jax.errors import ConfigError
from qaconv_jax.optim import (
  clip_by_group_norm,
  final_epoch,
  group_labels,
  learning_rate,
  lr_schedule,
  make_optimizer,
)


def _cfg(**kw):
  base = dict(
    lr=0.01,
    schedule="step",
    decay_epochs=(1,),
    decay_factor=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    lr_multipliers=(("^backbone/", 0.1),),
    plateau_patience=2,
    step_factor=0.7,
    clip_norm=0.0,
    clip_groups=(),
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def torch_sgd_ref(params, grads_seq, lrs, momentum, wd):
  """torch.optim.SGD(nesterov=True) per parameter: buf = m*buf + (g + wd*p);
  p -= lr * ((g + wd*p) + m*buf)."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  buf = {k: None for k in p}
  for grads, lr in zip(grads_seq, lrs):
    for k in p:
      g = grads[k] + wd * p[k]
      buf[k] = g.copy() if buf[k] is None else momentum * buf[k] + g
      p[k] = p[k] - lr[k] * (g + momentum * buf[k])
  return p


def test_sgd_matches_torch_rule_with_groups_and_decay(rng):
  params = {
    "backbone": {"w": rng.normal(size=(3, 2)).astype(np.float32)},
    "neck": {"w": rng.normal(size=(4,)).astype(np.float32)},
  }
  grads_seq = [
    jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params) for _ in range(5)
  ]
  tx = make_optimizer(_cfg(), steps_per_epoch=2)  # x0.1 from step 2 on
  opt_state = tx.init(params)
  p = params
  base = [0.01, 0.01, 0.001, 0.001, 0.001]
  for g, lr in zip(grads_seq, base):
    updates, opt_state = tx.update(g, opt_state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    assert learning_rate(opt_state) == pytest.approx(lr)  # the rate this update used
  flat = lambda t: {"backbone": t["backbone"]["w"], "neck": t["neck"]["w"]}
  lrs = [{"backbone": 0.1 * b, "neck": b} for b in base]
  want = torch_sgd_ref(flat(params), [flat(g) for g in grads_seq], lrs, 0.9, 5e-4)
  for k in want:
    np.testing.assert_allclose(np.asarray(flat(p)[k]), want[k], rtol=1e-5, atol=1e-7)


def test_group_labels_by_regex():
  params = {
    "backbone": {"conv1": {"kernel": 0}},
    "neck": {"conv": {"kernel": 0}},
    "qaconv": {"fc": {"bias": 0}},
  }
  labels = group_labels(params, {"^backbone/": 0.1, "fc/bias$": 2.0})
  assert labels == {
    "backbone": {"conv1": {"kernel": "^backbone/"}},
    "neck": {"conv": {"kernel": "default"}},
    "qaconv": {"fc": {"bias": "fc/bias$"}},
  }


def test_schedules():
  step = lr_schedule(_cfg(decay_epochs=(40,)), steps_per_epoch=10)
  assert float(step(399)) == pytest.approx(0.01) and float(step(400)) == pytest.approx(0.001)
  assert float(lr_schedule(_cfg(schedule="constant"), 10)(10**6)) == pytest.approx(0.01)
  with pytest.raises(ValueError, match="optim.schedule"):
    lr_schedule(_cfg(schedule="cosine"), 10)


def test_plateau_scales_updates_down_when_the_loss_stops_improving():
  params = {"neck": {"w": np.ones(3, np.float32)}}
  cfg = _cfg(schedule="plateau", weight_decay=0.0, momentum=0.0, nesterov=False)
  tx = make_optimizer(cfg, steps_per_epoch=2)
  state = tx.init(params)
  grads = {"neck": {"w": np.ones(3, np.float32)}}
  lrs, sizes = [], []
  losses = [5.0, 5.0, 4.0, 4.0] + [4.0] * 8  # improves in epoch 2, then flat
  for loss in losses:
    updates, state = tx.update(grads, state, params, value=np.float32(loss))
    sizes.append(float(-updates["neck"]["w"][0]))
    lrs.append(learning_rate(state))
  # Epochs of 2 steps: epoch 2 improves, epochs 3-4 do not (patience 2) -> x0.1 at the end of
  # epoch 4; two more flat epochs -> x0.1 again (PyTorch's rule with cooldown 0).
  np.testing.assert_allclose(sizes, [0.01] * 7 + [0.001] * 4 + [0.0001], rtol=1e-5)
  np.testing.assert_allclose(lrs, sizes, rtol=1e-5)


def authors_adaptive(epoch_losses, max_epochs, step_factor):
  """The schedule loop of the authors' v2.1 main.py, per epoch: (lr factor of each epoch,
  final_epochs)."""
  base_loss, final_epochs, stepped, factor, factors = None, max_epochs, False, 1.0, []
  for epoch, loss in enumerate(epoch_losses):
    factors.append(factor)
    if epoch == 1:
      base_loss = loss
    epoch1 = epoch + 1
    if not stepped and base_loss is not None and loss < base_loss * step_factor:
      stepped, final_epochs, factor = True, min(max_epochs, epoch1 + epoch1 // 2), factor * 0.1
    if epoch1 == final_epochs:
      break
  return factors, final_epochs


@pytest.mark.parametrize(
  "epoch_losses",
  [
    [9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.0, 3.0, 2.0, 1.0],  # steps after epoch 5 (5.5 < 5.6)
    [9.0, 8.0, 5.0, 3.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # at once after epoch 3
    [1.0, 8.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0],  # never: epoch 1 is not the base
  ],
)
def test_adaptive_schedule_follows_the_authors_loop(epoch_losses):
  per_epoch, max_epochs = 3, 10
  params = {"neck": {"w": np.ones(2, np.float32)}}
  cfg = _cfg(schedule="adaptive", weight_decay=0.0, momentum=0.0, nesterov=False)
  tx = make_optimizer(cfg, steps_per_epoch=per_epoch, num_epochs=max_epochs)
  state = tx.init(params)
  grads = {"neck": {"w": np.ones(2, np.float32)}}
  want_factors, want_final = authors_adaptive(epoch_losses, max_epochs, 0.7)
  sizes, finals = [], []
  for loss in epoch_losses[: len(want_factors)]:
    # Step losses around the epoch mean: the schedule must average them.
    for offset in (-0.5, 0.25, 0.25):
      updates, state = tx.update(grads, state, params, value=np.float32(loss + offset))
      sizes.append(float(-updates["neck"]["w"][0]))
    finals.append(final_epoch(state))
  np.testing.assert_allclose(sizes, np.repeat(want_factors, per_epoch) * 0.01, rtol=1e-5)
  assert finals[-1] == want_final
  assert learning_rate(state) == pytest.approx(0.01 * (0.1 if want_final < max_epochs else 1))
  with pytest.raises(ConfigError, match="num_epochs"):
    make_optimizer(cfg, steps_per_epoch=per_epoch)


def test_group_clipping_follows_torch_clip_grad_norm_per_group(rng):
  params = {
    "backbone": {"w": np.zeros((3, 2), np.float32)},
    "neck": {"w": np.zeros(4, np.float32)},
    "qaconv": {"fc": np.zeros(2, np.float32), "bn": np.zeros(1, np.float32)},
  }
  grads = {
    "backbone": {"w": 5 * rng.normal(size=(3, 2)).astype(np.float32)},
    "neck": {"w": 5 * rng.normal(size=4).astype(np.float32)},
    "qaconv": {"fc": np.array([0.3, 0.4], np.float32), "bn": np.zeros(1, np.float32)},
  }
  tx = clip_by_group_norm(8.0, ("^(backbone|neck)/", "^qaconv/"))
  clipped, _ = tx.update(grads, tx.init(params))
  model = np.concatenate([grads["backbone"]["w"].ravel(), grads["neck"]["w"]]).astype(np.float64)
  scale = min(1.0, 8.0 / (np.linalg.norm(model) + 1e-6))  # torch.nn.utils.clip_grad_norm_
  assert scale < 1  # the model group is clipped ...
  np.testing.assert_allclose(clipped["neck"]["w"], grads["neck"]["w"] * scale, rtol=1e-5)
  np.testing.assert_allclose(clipped["backbone"]["w"], grads["backbone"]["w"] * scale, rtol=1e-5)
  np.testing.assert_array_equal(clipped["qaconv"]["fc"], grads["qaconv"]["fc"])  # ... alone
  with pytest.raises(ConfigError, match="do not cover every parameter"):
    clip_by_group_norm(8.0, ("^backbone/",)).init(params)


def test_clipping_comes_before_weight_decay_and_momentum(rng):
  """torch: clip_grad_norm_ on the raw gradients (model and matcher apart), then SGD adds the
  weight decay and updates the momentum buffer."""
  params = {
    "backbone": {"w": rng.normal(size=(3, 2)).astype(np.float32)},
    "qaconv": {"w": rng.normal(size=(4,)).astype(np.float32)},
  }
  grads_seq = [
    jax.tree.map(lambda a: 20 * rng.normal(size=a.shape).astype(np.float32), params)
    for _ in range(4)
  ]
  cfg = _cfg(schedule="constant", clip_norm=8.0, clip_groups=("^backbone/", "^qaconv/"))
  cfg.weight_decay = 0.5  # large, so decay before the clip would change the result visibly
  tx = make_optimizer(cfg, steps_per_epoch=2)
  opt_state, p = tx.init(params), params
  for g in grads_seq:
    updates, opt_state = tx.update(g, opt_state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  flat = lambda t: {"backbone": t["backbone"]["w"], "qaconv": t["qaconv"]["w"]}
  clipped = [
    {
      k: v * min(1.0, 8.0 / (np.linalg.norm(v.astype(np.float64)) + 1e-6))
      for k, v in flat(g).items()
    }
    for g in grads_seq
  ]
  lrs = [{"backbone": 0.001, "qaconv": 0.01}] * len(grads_seq)
  want = torch_sgd_ref(flat(params), clipped, lrs, 0.9, 0.5)
  for k in want:
    np.testing.assert_allclose(np.asarray(flat(p)[k]), want[k], rtol=1e-5, atol=1e-6)
