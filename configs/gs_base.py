"""QAConv 2.1 (QAConv-GS, the authors' HEAD recipe; docs/method.md §12), shared by the gs_*
configs: ResNet-50 IBN-b, neck v2.1, head v2, 384x128, graph-sampled batches of 64 (32
classes x K=2), batch-hard triplet loss (margin 16) on the batch's scores against itself,
backbone and neck BN frozen, SGD Nesterov lr 0.005 (backbone 0.1x) with gradient clipping at
norm 8 for the model and the matcher separately, the v1.2 augmentation and the adaptive
schedule (at most 60 epochs). Numerics "auto": bfloat16 on accelerators (the authors train
with AMP), float32 on CPU."""

import ml_collections

from configs.base import paper_config, source, tiny
from configs.base import variant as base_variant


def gs_config(train: str, testsets: str, combine_all: bool = False) -> ml_collections.ConfigDict:
  c = paper_config(train=train, testsets=testsets, depth=50)
  c.model.update(ibn="b", neck_version="v2.1", head="v2")
  c.loss.update(name="triplet", margin=16.0)
  c.data.update(batch_size=64, sampler="graph", pk_k=2, augment="v1.2", combine_all=combine_all)
  c.optim.update(
    lr=0.005,
    lr_multipliers=(("^backbone/", 0.1),),
    schedule="adaptive",
    step_factor=0.7,
    decay_factor=0.1,
    clip_norm=8.0,
    clip_groups=("^(backbone|neck)/", "^qaconv/"),
  )
  c.freeze_bn = True
  c.num_epochs = 60  # the most; the adaptive schedule usually ends sooner
  c.log_every = 100
  c.checkpoint.every = 2000
  # The authors' HEAD ranks by -logit; plain ranking equals sigmoid's, +RR / +TLift do not.
  c.eval.distance = "neg_logit"
  c.eval.tlift = False  # the authors' main.py applies TLift only when asked (--do_tlift)
  return c


def gs_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`configs.base.tiny` for the GS recipe: 8 synthetic training classes (of 16 ids), 4 x 4
  per batch, so each batch holds a class and its 3 nearest of 7 others, and an epoch is 8
  steps whose graph step embeds 8 images."""
  c = tiny(c)
  # Synthetic data has no MSMT17-all to combine.
  c.data.update(
    **source(domain="a", ids=16), batch_size=16, sampler="graph", pk_k=4, combine_all=False
  )
  c.optim.update(lr=0.05, lr_multipliers=(("^backbone/", 0.5),))
  c.num_epochs = 4
  c.checkpoint.update(every=4, keep=2)
  return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  return base_variant(c, arg, shrink=gs_tiny)
