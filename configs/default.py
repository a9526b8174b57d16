"""The demo: train on synthetic domain a, evaluate on synthetic domain b (no download).

A small ResNet-18 at 64x32 trained from scratch: ~3 minutes on 2 CPU cores. It departs from
the paper's recipe where a from-scratch network in a few thousand steps needs it: flip-only
augmentation (the v1.0 occluder, up to 80% of the width, stalls learning here), a higher
learning rate, and P x K = 16 x 2 batches so every class memory row is refreshed every ~5
steps. ``:tiny`` is the few-second variant the tests reuse.
"""

import ml_collections

from configs.base import paper_config, source, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = paper_config(testsets="synthetic_b", depth=18)
  c.model.update(width=16, neck_dim=32)
  c.data.update(
    **source(domain="a", ids=160),
    image_size=(64, 32),
    batch_size=32,
    sampler="pk",
    pk_k=2,
    augment="flip",
  )
  c.optim.update(lr=0.1, lr_multipliers=(("^backbone/", 0.5),), decay_epochs=(240,))
  c.num_epochs = 300  # 5 steps per epoch: 1500 steps
  c.log_every = 100
  c.checkpoint.update(every=500, keep=2)
  c.eval.update(batch_size=64, memory_budget_gb=0.5)
  c = variant(c, arg)
  if arg == "tiny":
    c.data.augment = "v1.0"  # the tests exercise the official augmentation path
    c.optim.decay_epochs = (40,)
  return c
