"""Paper setup: ResNet-50 trained on msmt17, evaluated on market1501,dukemtmc (v1.0 recipe,
384x128)."""

import ml_collections

from configs.base import paper_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variant(paper_config(train="msmt17", testsets="market1501,dukemtmc", depth=50), arg)
