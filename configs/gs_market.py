"""QAConv 2.1 (graph sampling, triplet loss) trained on market1501, tested on the authors'
default test sets CUHK03-NP (detected) and MSMT17 (configs/gs_base.py)."""

import ml_collections

from configs.gs_base import gs_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variant(gs_config(train="market1501", testsets="cuhk03_detected,msmt17"), arg)
