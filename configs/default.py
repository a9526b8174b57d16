"""Default configuration: the paper's v1.0 recipe (SPEC sections 1-4).

``get_config()`` is the full-size setup (ResNet-50, 384x128, batch 32);
``get_config("tiny")`` is the small variant the tests and the CPU demo reuse.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      depth=50,
      width=64,               # torchvision's stem width; tiny variants shrink it
      neck_dim=128,
      neck_version="v1",      # "v1": conv + BN; "v2.1": conv with bias, no BN
      head="v1",              # "v1": Dense(2hw -> 1); "v2": shared Dense(hw -> 1), summed
      input_norm="none",      # official: RGB in [0, 1], no mean/std
      dtype="float32",        # compute dtype; parameters stay float32
      match_block=(8, 16),    # (probe, gallery) tile of match_maxima; None = one einsum
  ))
  c.loss = ml_collections.ConfigDict(dict(
      gamma=2.0,
      all_valid=True,         # v1.0: every memory class counts from step 0
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=0.01,
      schedule="step",
      decay_epochs=(40,),
      decay_factor=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      lr_multipliers=(("^backbone/", 0.1),),
  ))
  c.data = ml_collections.ConfigDict(dict(
      dataset="market1501",   # parser / TFDS builder name (qaconv_jax.data.datasets.LOADERS)
      root="",                # the dataset's own folder (raw layout) ...
      tfds_dir="",            # ... or a TFDS data_dir prepared by qaconv_jax.data.prepare
      image_size=(384, 128),
      batch_size=32,          # global, over all hosts and devices
      sampler="shuffle",      # "shuffle" (v1.0: shuffled epochs) or "pk" (P x K identities)
      pk_k=4,                 # K images per identity when sampler == "pk"
      augment="v1.0",         # "v1.0" flip + occlusion; "v1.2" adds crop/rotate/jitter; "none"
  ))
  c.num_epochs = 60

  if arg == "tiny":
    c.model.update(depth=18, width=16, neck_dim=32)
    c.data.update(image_size=(64, 32), batch_size=16)
    c.optim.update(lr=0.1, lr_multipliers=(("^backbone/", 0.5),))
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'tiny'.")
  return c
