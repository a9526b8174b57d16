"""The demo: train on synthetic domain a, evaluate on synthetic domain b (no download).

A ResNet-18 at 128x64 that trains in a few minutes on 2 CPU cores. ``:tiny`` is the
few-second variant the tests reuse.
"""

import ml_collections

from configs.base import paper_config, source, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = paper_config(testsets="synthetic_b", depth=18)
  c.model.update(width=32, neck_dim=64)
  c.data.update(**source(domain="a", ids=500), image_size=(128, 64), batch_size=32,
                sampler="pk", pk_k=4)
  c.optim.update(lr=0.05, lr_multipliers=(("^backbone/", 0.5),), decay_epochs=(8,))
  c.num_epochs = 10
  c.log_every = 25
  c.checkpoint.update(every=200, keep=2)
  c.eval.update(batch_size=64, memory_budget_gb=0.5)
  return variant(c, arg)
