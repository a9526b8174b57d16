"""Demo: train a small QAConv on synthetic identities, then match unseen people.

  python -m qaconv_jax.demo [--config configs/default.py:tiny] [--steps 400]

Trains with the real class-memory step, then scores a probe set of identities never seen
in training against a gallery, printing rank-1 before and after training, the score gap
between true and false pairs, and the strongest local correspondences of one match.
(Full training/evaluation lands with train.py and eval.py.)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qaconv_jax.data.synthetic import make_identity_set
from qaconv_jax.models.model import QAConvModel, build_model
from qaconv_jax.models.qaconv import match_maxima_with_indices, qaconv_score
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import check_finite, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py:tiny",
                                          "Model/optimiser config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_TRAIN_IDS = flags.DEFINE_integer("train_ids", 64, "Training identities.")
_TEST_IDS = flags.DEFINE_integer("test_ids", 48, "Unseen identities to match.")


def _evaluate(model, variables, probe, gallery, probe_ids, gallery_ids):
  """Rank-1 and mean score of true/false pairs of unseen identities."""
  embed = jax.jit(lambda v, x: model.apply(v, x, train=False, method=QAConvModel.embed))
  match = jax.jit(lambda v, p, g: model.apply(v, p, g, train=False, method=QAConvModel.match))
  fp, fg = embed(variables, probe), embed(variables, gallery)
  score = np.asarray(qaconv_score(match(variables, fp, fg)))  # [p, g]
  same = probe_ids[:, None] == gallery_ids[None, :]
  rank1 = float(np.mean(gallery_ids[score.argmax(axis=1)] == probe_ids))
  return rank1, float(score[same].mean()), float(score[~same].mean()), fp, fg


def main(argv):
  del argv
  cfg = _CONFIG.value
  size = tuple(cfg.data.image_size)
  n_train, per_id = _TRAIN_IDS.value, 8
  t0 = time.time()
  images, labels = make_identity_set(n_train, per_id, seed=cfg.seed, size=size)
  # Unseen people: a different seed; image 0 of each is the probe, 1-2 the gallery.
  test_images, test_labels = make_identity_set(_TEST_IDS.value, 3, seed=cfg.seed + 1000,
                                               size=size)
  probe_rows = np.arange(0, len(test_images), 3)
  gallery_rows = np.setdiff1d(np.arange(len(test_images)), probe_rows)
  to_float = lambda x: jnp.asarray(x, jnp.float32) / 255.0
  probe, gallery = to_float(test_images[probe_rows]), to_float(test_images[gallery_rows])
  probe_ids, gallery_ids = test_labels[probe_rows], test_labels[gallery_rows]
  print(f"synthetic data: {n_train} training identities x {per_id} images, "
        f"{len(probe_rows)} unseen probes vs {len(gallery_rows)} gallery images, "
        f"{size[0]}x{size[1]} ({time.time() - t0:.1f}s)")

  model = build_model(cfg.model)
  tx = make_optimizer(cfg.optim, steps_per_epoch=max(1, n_train * per_id // cfg.data.batch_size))
  state = create_train_state(model, tx, jax.random.key(cfg.seed), size, n_train, cfg.loss)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"model: ResNet-{cfg.model.depth} (width {cfg.model.width}) + neck {cfg.model.neck_dim} "
        f"+ QAConv head {cfg.model.head}; {n_params:,} parameters; "
        f"memory {tuple(state.class_memory.shape)}")
  before = _evaluate(model, {"params": state.params, "batch_stats": state.batch_stats},
                     probe, gallery, probe_ids, gallery_ids)

  step = make_train_step(cfg.loss)
  rng = jax.random.key(cfg.seed + 1)
  sampler = np.random.default_rng(cfg.seed)
  k = 2
  p = cfg.data.batch_size // k
  t0 = time.time()
  for i in range(_STEPS.value):
    ids = sampler.choice(n_train, p, replace=False)  # P identities x K images
    idx = np.concatenate([sampler.choice(per_id, k, replace=False) + c * per_id for c in ids])
    images_b = to_float(images[idx])
    flip = sampler.random(len(idx)) < 0.5  # random horizontal flip, as in training recipes
    images_b = jnp.where(flip[:, None, None, None], images_b[:, :, ::-1], images_b)
    state, metrics = step(state, {"image": images_b, "label": jnp.asarray(labels[idx])}, rng)
    if i % 25 == 0 or i == _STEPS.value - 1:
      check_finite(metrics, i)
      print(f"step {i + 1:4d}  loss {float(metrics['loss']):.4f}  "
            f"memory acc {float(metrics['accuracy']):.3f}  "
            f"grad norm {float(metrics['grad_norm']):.3f}  ({time.time() - t0:.1f}s)")

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  after = _evaluate(model, variables, probe, gallery, probe_ids, gallery_ids)
  print(f"\nunseen identities ({len(probe_rows)} probes, chance rank-1 "
        f"{1 / _TEST_IDS.value:.1%}):")
  print(f"  {'':10s} {'rank-1':>8s} {'score same':>11s} {'score diff':>11s}")
  for name, (r1, s_same, s_diff, *_) in (("untrained", before), ("trained", after)):
    print(f"  {name:10s} {r1:8.1%} {s_same:11.4f} {s_diff:11.4f}")

  # The interpretable part: where did probe 0 find itself in its true match?
  fp, fg = after[3], after[4]
  g0 = int(np.flatnonzero(gallery_ids == probe_ids[0])[0])
  maxima, idx = match_maxima_with_indices(fp[:1], fg[g0:g0 + 1])
  hw = fp.shape[1] * fp.shape[2]
  w = fp.shape[2]
  best = np.asarray(maxima[0, 0, hw:])  # probe-indexed half: best gallery match per probe loc
  order = np.argsort(-best)[:5]
  print(f"\nstrongest local correspondences, probe 0 -> its gallery image "
        f"(feature map {fp.shape[1]}x{fp.shape[2]}, (row, col)):")
  for s in order:
    r = int(idx[0, 0, hw + s])
    print(f"  probe {divmod(int(s), w)} -> gallery {divmod(r, w)}  cosine {best[s]:.3f}")


if __name__ == "__main__":
  app.run(main)
