"""Paper setup: ResNet-50 trained on market1501, evaluated on dukemtmc (v1.0 recipe, 384x128)."""

import ml_collections

from configs.base import paper_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variant(paper_config(train="market1501", testsets="dukemtmc", depth=50), arg)
