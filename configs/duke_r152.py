"""Paper setup: ResNet-152 trained on dukemtmc, evaluated on market1501 (v1.0 recipe, 384x128)."""

import ml_collections

from configs.base import paper_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variant(paper_config(train="dukemtmc", testsets="market1501", depth=152), arg)
