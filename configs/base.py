"""The paper's v1.0 recipe (docs/method.md §1-§4), shared by every config, and the tiny shrink."""

import ml_collections


def source(dataset="market1501", domain="", ids=0):
  """A data set: a raw folder (root), a prepared TFDS dir (tfds_dir), or synthetic data
  generated on first use under <workdir>/data/ (synthetic_domain, synthetic_ids)."""
  return dict(dataset=dataset, root="", tfds_dir="", synthetic_domain=domain, synthetic_ids=ids)


def paper_config(
  train: str = "market1501", testsets: str = "dukemtmc", depth: int = 50
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
    dict(
      depth=depth,
      width=64,  # torchvision's stem width; tiny variants shrink it
      ibn="",  # "": plain ResNet; "a" / "b": IBN-Net-a / -b (docs/method.md §1)
      # The stage the maps come from (the authors' --final_layer): "layer3" (stride 16, the
      # paper's) or "layer2" (stride 8: 4x the locations at a quarter of layer3's channels).
      final_stage="layer3",
      neck_dim=128,
      neck_version="v1",  # "v1": conv + BN; "v2.1": conv with bias, no BN
      head="v1",  # "v1" Dense(2hw -> 1); "v2" shared Dense(hw -> 1); "gap" baseline
      input_norm="none",  # official: RGB in [0, 1], no mean/std
      # Runtime knobs (a checkpoint does not depend on them; qaconv_jax.models.model.RUNTIME_KEYS):
      # numerics of training, qaconv_jax/numerics.py: "auto" = bfloat16 on GPU/TPU, float32
      # on CPU; "float32" (HIGHEST precision), "tf32" or "bfloat16".
      dtype="auto",
      # (probe, gallery) tile of match_maxima: "auto" (per backend), (tp, tg), or None = one
      # einsum. Any of these types, also from the command line: --config.model.match_block=(16,64)
      match_block=ml_collections.FieldReference("auto", field_type=object),
      match_impl="xla",  # "xla" or "pallas" (fused kernel; interpreted on CPU)
    )
  )
  c.loss = ml_collections.ConfigDict(
    dict(
      # "class_memory" (v1.x: focal loss against the class memory), or QAConv 2.1's losses
      # on the batch's [b, b] scores: "triplet" (batch-hard, margin) or "pairwise_matching"
      # (docs/method.md §12); those two need data.sampler="graph" or "pk".
      name="class_memory",
      gamma=2.0,  # focal exponent (class_memory)
      all_valid=True,  # v1.0: all classes count (class_memory)
      margin=16.0,  # triplet
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=0.01,
      schedule="step",  # "step" (v1.0), "plateau" (the paper's text) or "constant"
      decay_epochs=(40,),
      decay_factor=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      lr_multipliers=(("^backbone/", 0.1),),
      plateau_patience=10,  # schedule="plateau": epochs without improvement (PyTorch's default)
      # schedule="adaptive" (QAConv 2.1): the first epoch after the 2nd whose mean loss is
      # below step_factor x the 2nd epoch's multiplies every rate by decay_factor and ends
      # training at min(num_epochs, e + e // 2) epochs.
      step_factor=0.7,
      # Clip each group's gradient (path regexes) to this global norm, separately; 0 = none.
      clip_norm=0.0,
      clip_groups=(),
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      **source(train),
      image_size=(384, 128),
      batch_size=32,  # global, over all hosts and devices
      # "shuffle" (v1.0: shuffled epochs), "pk" (P x K identities) or "graph" (QAConv 2.1:
      # each class with its nearest classes, K images each; one batch per class an epoch)
      sampler="shuffle",
      pk_k=4,  # K images per identity when sampler is "pk" or "graph"
      augment="v1.0",  # "v1.0" flip + occlusion; "v1.2" adds crop/rotate/jitter; "none"
      # Validation split held out from the training identities (docs/method.md §5): a count
      # >= 1 or a fraction in (0, 1) of them; 0 = none (the paper trains on every identity).
      val_ids=0.0,
      val_seed=0,  # which identities and which query images
      # MSMT17 only (the authors' --combine_all, docs/method.md §8): train on train + val +
      # query + gallery, all 4,101 identities (test ids relabelled after the training ones).
      combine_all=False,
    )
  )
  c.num_epochs = 60
  c.max_steps = 0  # stop (checkpointing first) after this global step; 0 = none
  c.init_from = ""  # a workdir, or a dir written by qaconv_jax.convert, to start from
  c.init_memory = False  # also take init_from's class memory (same training classes)
  # QAConv 2.1: backbone and neck BN in inference mode while training (their statistics used,
  # not updated); the matcher's BN trains.
  c.freeze_bn = False
  c.log_every = 50
  c.eval_every = 0  # steps between validation evaluations (needs data.val_ids); 0 = none
  # keep_best: also keep the checkpoint of best validation mAP in <workdir>/best/ (needs
  # data.val_ids and eval_every). Test sets are evaluated once, at the end, on the final state.
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, keep_best=False))
  c.debug_nan_step = -1  # tests: feed a NaN image at this step
  c.eval = ml_collections.ConfigDict(
    dict(
      testsets=testsets,  # comma-separated keys of eval.sources
      sources=ml_collections.ConfigDict(
        dict(
          market1501=source("market1501"),
          dukemtmc=source("dukemtmc"),
          msmt17=source("msmt17"),
          cuhk03_detected=source("cuhk03_detected"),
          cuhk03_labeled=source("cuhk03_labeled"),
          synthetic_a=source(domain="a", ids=500),
          synthetic_b=source(domain="b", ids=500),
        )
      ),
      batch_size=64,
      dtype="float32",  # numerics of evaluation: float32 at HIGHEST precision, the paper's
      memory_budget_gb=2.0,  # working set of one probe x gallery scoring block
      # Distance from QAConv logits (docs/method.md §5): "sigmoid" = 1 - sigmoid(logit / 10)
      # (authors' v1.x and v2.1 tag); "neg_logit" = -logit (their master). Plain ranking is
      # the same; +RR and +RR+TLift differ. Not part of the model (any checkpoint takes both).
      distance="sigmoid",
      rerank=True,
      k1=20,
      k2=6,
      lambda_value=0.3,
      tlift=True,
      tau=100.0,
      sigma=200.0,
      tlift_k=10,
      alpha=0.2,
      ap_mode="step",  # "step" or "trapezoid" (v1.0)
      topk=10,  # per-query ranked lists written to <workdir>/eval/
      # Large galleries (docs/method.md §13). shortlist K > 0: two-stage retrieval, QAConv
      # re-scores each query's K nearest by the global descriptor (0: every pair, exact).
      shortlist=0,
      # Two-stage re-ranking: each image's neighbour shortlist over probe + gallery, re-scored
      # by QAConv (0: eval.shortlist); it needs k1 + 1 entries, more catch more neighbours.
      neighbour_shortlist=0,
      # Two-stage re-ranking: each image's farthest by the global descriptor, also scored,
      # estimate its column maximum (exact when shortlists cover everything).
      shortlist_far=10,
      map_dtype="float32",  # stored maps: "float32", "float16" or "bfloat16" (half the RAM)
      gallery_memmap="",  # a directory: gallery maps kept in a memory-mapped file there
      # Where shortlisted maps are gathered (speed only): "host", "device" (the whole table
      # on every device once) or "auto" (device on accelerators when it fits in half).
      lists_gather="auto",
    )
  )
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few-second CPU variant of any config: small net, small images, synthetic data."""
  c.model.update(depth=18, width=16, neck_dim=32, final_stage="layer3")
  c.data.update(
    **source(domain="a", ids=16), image_size=(64, 32), batch_size=16, sampler="pk", pk_k=2
  )
  c.optim.update(lr=0.1, lr_multipliers=(("^backbone/", 0.5),))
  c.num_epochs = 6
  c.log_every = 1
  c.checkpoint.update(every=2, keep=2)
  c.eval.update(testsets="synthetic_b", batch_size=32, memory_budget_gb=0.05)
  c.eval.sources.synthetic_b.synthetic_ids = 40
  return c


def variant(
  c: ml_collections.ConfigDict, arg: str | None, shrink=tiny
) -> ml_collections.ConfigDict:
  """``get_config(arg)``'s variant: ``"tiny"`` applies ``shrink``; none keeps ``c``."""
  if arg == "tiny":
    return shrink(c)
  if arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'tiny'.")
  return c
