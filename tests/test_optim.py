"""The optimiser against PyTorch's SGD rule written out in NumPy (docs/method.md §4)."""

import jax
import ml_collections
import numpy as np
import pytest

from qaconv_jax.optim import group_labels, learning_rate, lr_schedule, make_optimizer


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
