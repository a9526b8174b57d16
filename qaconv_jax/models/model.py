"""The full QAConv network: ResNet backbone -> neck -> unit feature maps -> QAConv head."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from qaconv_jax.errors import ConfigError
from qaconv_jax.models.init import torch_default_kernel_init, uniform
from qaconv_jax.models.matching import resolve_options
from qaconv_jax.models.norm import BatchNorm
from qaconv_jax.models.qaconv import QAConv
from qaconv_jax.models.resnet import ResNet
from qaconv_jax.numerics import resolve as resolve_numerics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Unit length over the last axis, ``x / max(||x||, eps)`` (PyTorch ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class Neck(nn.Module):
  """3x3 conv to ``dim`` channels, then BN ("v1", v1.0-v2.0) or a conv bias ("v2.1").

  No ReLU. Output ``[N, h, w, dim]`` float32, L2-normalised at every location.
  """

  dim: int = 128
  version: str = "v1"
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.version not in ("v1", "v2.1"):
      raise ConfigError(f"neck version must be 'v1' or 'v2.1', got {self.version!r}.")
    fan_in = 9 * x.shape[-1]
    x = nn.Conv(
      self.dim,
      (3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=self.version == "v2.1",
      kernel_init=torch_default_kernel_init,
      bias_init=uniform(fan_in**-0.5),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.precision,
      name="conv",
    )(x)
    if self.version == "v1":
      x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return l2_normalize(x.astype(jnp.float32))


class GapCosine(nn.Module):
  """The paper's baseline (Table 2): cosine of globally average-pooled, L2-normalised maps,
  then the same scalar ``logit_bn`` so it trains with the same class-memory loss.

  ``(probe [p,h,w,d], gallery [g,h,w,d], train, gallery_mask [g] | None) -> logits [p, g]``;
  with ``anchor_is_probe [B, K]``: anchors ``[B,h,w,d]`` x their candidates ``[B,K,h,w,d]``
  -> ``[B, K]`` (the cosine is symmetric, so the roles do not matter).
  """

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(
    self,
    probe: jax.Array,
    gallery: jax.Array,
    train: bool,
    gallery_mask: jax.Array | None = None,
    anchor_is_probe: jax.Array | None = None,
  ) -> jax.Array:
    # Maps stored in float16 / bfloat16 (eval.map_dtype) are pooled in float32.
    probe, gallery = probe.astype(jnp.float32), gallery.astype(jnp.float32)
    p = l2_normalize(probe.mean(axis=(1, 2)))  # [p, d] (lists: [B, d])
    if anchor_is_probe is not None:
      g = l2_normalize(gallery.mean(axis=(2, 3)))  # [B, K, d]
      cosine = jnp.einsum("bd,bkd->bk", p, g, precision=self.precision)  # [B, K]
    else:
      g = l2_normalize(gallery.mean(axis=(1, 2)))  # [g, d]
      cosine = jnp.dot(p, g.T, precision=self.precision)  # [p, g]
    mask = None if gallery_mask is None else gallery_mask[None, :]
    return BatchNorm(scalar=True, name="logit_bn")(cosine, train, mask)


class QAConvModel(nn.Module):
  """Backbone + neck + matcher, with submodules ``backbone``, ``neck``, ``qaconv``.

  ``embed(images [N, H, W, 3] in [0, 1], train) -> [N, h, w, d]`` unit feature maps;
  ``match(probe, gallery, train) -> logits [p, g]``;
  ``match_lists(anchor [B,h,w,d], cands [B,K,h,w,d], anchor_is_probe [B,K]) -> [B, K]``
  (inference mode; docs/method.md §13);
  ``__call__(images, memory=None, train, memory_mask=None, embed_train=None)`` ->
  ``(features, logits)``, matching the batch against ``memory [C, h, w, d]`` (or against
  itself when no memory is given: logits ``[b, b]``, QAConv 2.1's training scores);
  ``memory_mask [C]`` marks real rows of a padded memory; ``embed_train`` (default
  ``train``) is the backbone and neck's BN mode.

  The fields after ``input_norm`` are runtime knobs (`RUNTIME_KEYS`): they change speed and
  rounding, never a weight, so a checkpoint can be resumed or evaluated with other values.
  """

  depth: int = 50
  width: int = 64
  ibn: str = ""  # "", "a" or "b": IBN-Net backbone variants
  final_stage: str = "layer3"  # the authors' final_layer: "layer2" (stride 8) or "layer3" (16)
  neck_dim: int = 128
  neck_version: str = "v1"
  head: str = "v1"
  input_norm: str = "none"  # "none" (official: RGB in [0, 1]) or "imagenet"
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST
  match_block: tuple[int, int] | str | None = "auto"
  match_impl: str = "xla"
  memory_axis: str | None = None  # mesh axis the class memory is split over
  anchors_per_step: int = 1  # match_lists: anchors vectorised together (speed only)

  def setup(self):
    if self.input_norm not in ("none", "imagenet"):
      raise ConfigError(f"input_norm must be 'none' or 'imagenet', got {self.input_norm!r}.")
    self.backbone = ResNet(
      depth=self.depth,
      final_stage=self.final_stage,
      width=self.width,
      ibn=self.ibn,
      dtype=self.dtype,
      precision=self.precision,
    )
    self.neck = Neck(
      dim=self.neck_dim, version=self.neck_version, dtype=self.dtype, precision=self.precision
    )
    if self.head == "gap":
      self.qaconv = GapCosine(precision=self.precision)
    else:
      self.qaconv = QAConv(
        head=self.head,
        block=self.match_block,
        impl=self.match_impl,
        dtype=self.dtype,
        precision=self.precision,
        gallery_axis=self.memory_axis,
        anchors_per_step=self.anchors_per_step,
      )

  def embed(self, images: jax.Array, train: bool) -> jax.Array:
    if self.input_norm == "imagenet":
      images = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return self.neck(self.backbone(images, train), train)

  def match(
    self, probe: jax.Array, gallery: jax.Array, train: bool, gallery_mask: jax.Array | None = None
  ) -> jax.Array:
    return self.qaconv(probe, gallery, train, gallery_mask)

  def match_lists(
    self, anchor: jax.Array, cands: jax.Array, anchor_is_probe: jax.Array
  ) -> jax.Array:
    return self.qaconv(anchor, cands, False, None, anchor_is_probe)

  def __call__(
    self,
    images: jax.Array,
    memory: jax.Array | None = None,
    train: bool = False,
    memory_mask: jax.Array | None = None,
    embed_train: bool | None = None,
  ):
    # embed_train=False with train=True: backbone and neck BN in inference mode (statistics
    # used, not updated) while the matcher's BN trains (QAConv 2.1, config.freeze_bn).
    features = self.embed(images, train if embed_train is None else embed_train)
    gallery = features if memory is None else memory
    return features, self.match(features, gallery, train, memory_mask)


# config.model keys that change speed and rounding only: a checkpoint does not depend on them.
RUNTIME_KEYS = ("dtype", "match_block", "match_impl")


def build_model(
  cfg: ml_collections.ConfigDict, *, numerics: str | None = None, memory_axis: str | None = None
) -> QAConvModel:
  """``config.model`` -> module. Every field is read, none defaulted here.

  ``numerics`` overrides ``cfg.dtype`` (evaluation passes ``config.eval.dtype``);
  ``memory_axis``: the mesh axis the class memory is split over in training (runtime).
  """
  policy = resolve_numerics(cfg.dtype if numerics is None else numerics)
  # Tiles resolved now ("auto" for this backend), so a bad value fails before any trace.
  block = resolve_options(cfg.match_block, cfg.match_impl).block
  return QAConvModel(
    depth=cfg.depth,
    width=cfg.width,
    ibn=cfg.ibn,
    final_stage=cfg.final_stage,
    neck_dim=cfg.neck_dim,
    neck_version=cfg.neck_version,
    head=cfg.head,
    input_norm=cfg.input_norm,
    dtype=policy.dtype,
    precision=policy.precision,
    match_block=block,
    match_impl=cfg.match_impl,
    memory_axis=memory_axis,
  )
