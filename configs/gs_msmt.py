"""QAConv 2.1 (graph sampling, triplet loss) trained on the msmt17 training set, tested on
CUHK03-NP (detected) and Market-1501 (configs/gs_base.py)."""

import ml_collections

from configs.gs_base import gs_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variant(gs_config(train="msmt17", testsets="cuhk03_detected,market1501"), arg)
