"""ResNet backbones in the torchvision v1.5 layout, NHWC, cut after a chosen stage.

Parameter paths mirror torchvision's state_dict keys so that a checkpoint converts by a
lookup table (`torchvision_key`): ``layer1.0.downsample.1.running_mean`` lives at
``batch_stats['layer1_0']['downsample_1']['mean']``.

QAConv uses the ``layer3`` output (stride 16): ``[N, H/16, W/16, 4*width*4]`` for
bottleneck nets (1024 channels for ResNet-50 at width 64).

IBN-Net variants (Pan et al. 2018, the layout of IBN-Net's own ``resnet*_ibn_{a,b}``):
  - "a": ``bn1`` of every block of layer1-3 is an `IBN` (half InstanceNorm, half BatchNorm);
  - "b": the stem ``bn1`` is an affine InstanceNorm, and the LAST block of layer1 and of
    layer2 applies an affine InstanceNorm (``IN``) after the residual sum, before the ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from qaconv_jax.errors import ConfigError
from qaconv_jax.models.init import resnet_conv_init
from qaconv_jax.models.norm import IBN, BatchNorm, InstanceNorm

STAGES = ("layer1", "layer2", "layer3", "layer4")

# depth -> (block kind, blocks per stage)
ARCHS = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}
IBN_TYPES = ("", "a", "b")


def _block_ibn(ibn: str, stage: int, block: int, count: int) -> str:
  """The IBN kind of one block: "a" in every block of layer1-3, "b" in the last block of
  layer1-2, "" elsewhere."""
  if ibn == "a" and stage < 3:
    return "a"
  if ibn == "b" and stage < 2 and block == count - 1:
    return "b"
  return ""


def _first_norm(ibn: str, dtype: Any):
  """The norm after conv1 of a block: IBN for "a" blocks, BatchNorm otherwise."""
  return IBN(dtype=dtype, name="bn1") if ibn == "a" else BatchNorm(dtype=dtype, name="bn1")


def _output(y, shortcut, ibn: str, dtype: Any):
  """Residual sum, the IBN-b instance norm (``IN``) where the block has one, ReLU."""
  y = y + shortcut
  if ibn == "b":
    y = InstanceNorm(dtype=dtype, name="IN")(y)
  return nn.relu(y)


def _conv(
  features: int, kernel: int, stride: int, name: str, dtype: Any, precision: Any
) -> nn.Conv:
  pad = kernel // 2  # explicit symmetric padding, as PyTorch (not "SAME")
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=resnet_conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    precision=precision,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Output channels = ``planes``."""

  planes: int
  stride: int = 1
  downsample: bool = False
  ibn: str = ""  # "", "a" or "b": see `_block_ibn`
  dtype: Any = jnp.float32
  precision: Any = None  # of every conv (qaconv_jax.numerics)
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 3, self.stride, "conv1", self.dtype, self.precision)(x)
    y = nn.relu(_first_norm(self.ibn, self.dtype)(y, train))
    y = _conv(self.planes, 3, 1, "conv2", self.dtype, self.precision)(y)
    y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
    if self.downsample:
      x = _conv(self.planes, 1, self.stride, "downsample_0", self.dtype, self.precision)(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, train)
    return _output(y, x, self.ibn, self.dtype)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1. Output channels = 4 * ``planes``."""

  planes: int
  stride: int = 1
  downsample: bool = False
  ibn: str = ""  # "", "a" or "b": see `_block_ibn`
  dtype: Any = jnp.float32
  precision: Any = None  # of every conv (qaconv_jax.numerics)
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 1, 1, "conv1", self.dtype, self.precision)(x)
    y = nn.relu(_first_norm(self.ibn, self.dtype)(y, train))
    y = _conv(self.planes, 3, self.stride, "conv2", self.dtype, self.precision)(y)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
    y = _conv(self.planes * 4, 1, 1, "conv3", self.dtype, self.precision)(y)
    y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
    if self.downsample:
      x = _conv(self.planes * 4, 1, self.stride, "downsample_0", self.dtype, self.precision)(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, train)
    return _output(y, x, self.ibn, self.dtype)


class ResNet(nn.Module):
  """torchvision ResNet up to ``final_stage``.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    final_stage: last stage built; QAConv uses "layer3" (stride 16).
    width: channels of the stem and of layer1's planes (64 in torchvision; tests shrink it).
    ibn: "" (plain ResNet), "a" or "b" (IBN-Net-a / -b, see the module docstring).
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.
    precision: of every conv (``jax.lax.Precision``; `qaconv_jax.numerics`).

  ``__call__(x [N, H, W, 3], train)`` returns the ``final_stage`` map, or with
  ``return_stages=True`` a dict ``{"stem", "layer1", ...}`` of every stage built.
  """

  depth: int = 50
  final_stage: str = "layer3"
  width: int = 64
  ibn: str = ""
  dtype: Any = jnp.float32
  precision: Any = None

  def _check_attributes(self):
    if self.depth not in ARCHS:
      raise ConfigError(f"ResNet depth must be one of {sorted(ARCHS)}, got {self.depth}.")
    if self.final_stage not in STAGES:
      raise ConfigError(f"final_stage must be one of {STAGES}, got {self.final_stage!r}.")
    if self.ibn not in IBN_TYPES:
      raise ConfigError(
        f"ibn must be one of {IBN_TYPES} (none, IBN-Net-a, IBN-Net-b), got {self.ibn!r}."
      )

  @nn.compact
  def __call__(self, x, train: bool, return_stages: bool = False):
    self._check_attributes()
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects images [N, H, W, 3] (NHWC), got shape {x.shape}.")
    kind, counts = ARCHS[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck

    x = x.astype(self.dtype)
    x = _conv(self.width, 7, 2, "conv1", self.dtype, self.precision)(x)
    if self.ibn == "b":
      x = InstanceNorm(dtype=self.dtype, name="bn1")(x)
    else:
      x = BatchNorm(dtype=self.dtype, name="bn1")(x, train)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outputs = {"stem": x}
    in_channels = self.width
    for s, (stage, count) in enumerate(zip(STAGES, counts)):
      planes = self.width * 2**s
      for b in range(count):
        stride = 2 if (b == 0 and s > 0) else 1
        out_channels = planes * block_cls.expansion
        needs_ds = b == 0 and (stride != 1 or in_channels != out_channels)
        x = block_cls(
          planes,
          stride,
          needs_ds,
          _block_ibn(self.ibn, s, b, count),
          self.dtype,
          self.precision,
          name=f"{stage}_{b}",
        )(x, train)
        in_channels = out_channels
      outputs[stage] = x
      if stage == self.final_stage:
        break
    return outputs if return_stages else x


def output_channels(depth: int, width: int = 64, final_stage: str = "layer3") -> int:
  """Channels of the ``final_stage`` map, e.g. 1024 for ResNet-50's layer3."""
  kind, _ = ARCHS[depth]
  expansion = 1 if kind == "basic" else 4
  return width * 2 ** STAGES.index(final_stage) * expansion


_TORCH_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def torchvision_key(collection: str, path: Sequence[str]) -> str:
  """Flax path in ``collection`` -> torchvision state_dict key.

  ``("params", ("layer2_0", "downsample_0", "kernel"))`` -> ``"layer2.0.downsample.0.weight"``.
  Module names ``name_i`` become ``name.i``; leaves follow PyTorch's naming.
  """
  *modules, leaf = path
  parts = []
  for m in modules:
    head, sep, tail = m.rpartition("_")
    parts.append(f"{head}.{tail}" if sep and tail.isdigit() else m)
  try:
    parts.append(_TORCH_LEAF[(collection, leaf)])
  except KeyError:
    raise KeyError(f"no torchvision name for {collection}/{'/'.join(path)}") from None
  return ".".join(parts)
