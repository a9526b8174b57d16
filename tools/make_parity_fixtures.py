"""Writes the PyTorch parity fixtures under tests/fixtures/parity/ (needs torch; CI never runs it).

    python tools/make_parity_fixtures.py [--out tests/fixtures/parity]

The reference modules below are plain torch written from docs/method.md §1-§3 and the published
key layouts (torchvision ResNet, IBN-Net's resnet*_ibn_{a,b}, the official QAConv ``resmap``
model and its v1.x ``QAConvLoss`` / v2.x ``ClassMemoryLoss`` + ``QAConv`` matcher), with small
widths and random weights, so the fixtures stay small (~1.7 MB together).

Each case writes two files:
  <case>.state.npz  the state_dict exactly as PyTorch names it (an official checkpoint's
                    ``model`` / ``criterion`` sections as ``model/<key>`` / ``criterion/<key>``,
                    plus ``epoch``): what ``qaconv_jax.convert`` reads;
  <case>.io.npz     inputs and PyTorch's outputs (NCHW, as torch returns them) and the number
                    of parameters and buffer values the converter must map.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

STAGES = ("layer1", "layer2", "layer3", "layer4")
ARCHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


# ----------------------------------------------------------------------------- backbones
class IBN(nn.Module):
  """IBN-a: InstanceNorm (affine) on the first half of the channels, BatchNorm on the rest."""

  def __init__(self, planes: int):
    super().__init__()
    self.half = planes // 2
    self.IN = nn.InstanceNorm2d(self.half, affine=True)
    self.BN = nn.BatchNorm2d(planes - self.half)

  def forward(self, x):
    return torch.cat(
      [self.IN(x[:, : self.half].contiguous()), self.BN(x[:, self.half :].contiguous())], dim=1
    )


class Block(nn.Module):
  """torchvision BasicBlock / Bottleneck (v1.5: stride on the 3x3), with IBN options."""

  def __init__(self, kind: str, inplanes: int, planes: int, stride: int, ibn: str):
    super().__init__()
    self.kind = kind
    out = planes * (1 if kind == "basic" else 4)
    norm1 = IBN(planes) if ibn == "a" else nn.BatchNorm2d(planes)
    if kind == "basic":
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = norm1
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
    else:
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = norm1
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
      )
    self.IN = nn.InstanceNorm2d(out, affine=True) if ibn == "b" else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    if self.kind == "basic":
      y = self.bn2(self.conv2(y))
    else:
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
    y = y + (x if self.downsample is None else self.downsample(x))
    if self.IN is not None:
      y = self.IN(y)
    return F.relu(y)


class ResNet(nn.Module):
  """torchvision / IBN-Net ResNet at a reduced ``width``; ``stages`` = how many are built
  (4 with the ImageNet ``fc``, as a real checkpoint has; 3 = trimmed at layer3)."""

  def __init__(self, depth: int, width: int, ibn: str = "", stages: int = 4, num_classes: int = 10):
    super().__init__()
    kind, counts = ARCHS[depth]
    expansion = 1 if kind == "basic" else 4
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.InstanceNorm2d(width, affine=True) if ibn == "b" else nn.BatchNorm2d(width)
    inplanes = width
    for s in range(stages):
      planes = width * 2**s
      blocks = []
      for b in range(counts[s]):
        block_ibn = (
          "a"
          if ibn == "a" and s < 3
          else "b"
          if ibn == "b" and s < 2 and b == counts[s] - 1
          else ""
        )
        blocks.append(Block(kind, inplanes, planes, 2 if (b == 0 and s > 0) else 1, block_ibn))
        inplanes = planes * expansion
      setattr(self, STAGES[s], nn.Sequential(*blocks))
    if stages == 4:
      self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    """Returns every stage output up to layer3 (what QAConv uses)."""
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    out = {}
    for stage in STAGES[:3]:
      x = getattr(self, stage)(x)
      out[stage] = x
    return out


class ResMap(nn.Module):
  """The official QAConv model: ``base`` ResNet (layer4/fc kept in the state_dict but
  unused) -> ``neck_conv`` 3x3 -> ``neck_bn`` (v1..v2.0) or a conv bias (v2.1) -> L2 norm."""

  def __init__(self, base: ResNet, in_channels: int, neck: int, neck_version: str):
    super().__init__()
    self.base = base
    self.neck_conv = nn.Conv2d(in_channels, neck, 3, 1, 1, bias=neck_version == "v2.1")
    self.neck_bn = nn.BatchNorm2d(neck) if neck_version == "v1" else None

  def forward(self, x):
    x = self.neck_conv(self.base(x)["layer3"])
    if self.neck_bn is not None:
      x = self.neck_bn(x)
    return F.normalize(x)


# ----------------------------------------------------------------------------- matchers
def maxima(prob, gal, probe_first: bool):
  """``prob [p, d, h, w]``, ``gal [g, d, h, w]`` -> ``[p, g, 2hw]`` best local cosines."""
  s = torch.einsum("pds,gdr->pgsr", prob.flatten(2), gal.flatten(2))  # [p, g, hw(s), hw(r)]
  for_gallery, for_probe = s.amax(dim=2), s.amax(dim=3)
  return torch.cat([for_probe, for_gallery] if probe_first else [for_gallery, for_probe], -1)


class V1Criterion(nn.Module):
  """v1.x ``QAConvLoss``: class memory + BN -> Linear(2hw -> 1) -> BN, focal BCE."""

  def __init__(self, num_classes: int, d: int, h: int, w: int, with_valid: bool = True):
    super().__init__()
    self.register_buffer("class_memory", torch.zeros(num_classes, d, h, w))
    if with_valid:
      self.register_buffer("valid_class", torch.zeros(num_classes))
    self.bn = nn.BatchNorm1d(1)
    self.fc = nn.Linear(2 * h * w, 1)
    self.logit_bn = nn.BatchNorm1d(1)

  def match(self, prob, gal):
    x = maxima(prob, gal, probe_first=False)  # gallery-indexed half first
    p, g, n = x.shape
    x = self.bn(x.reshape(p * g, 1, n)).reshape(p * g, n)
    return self.logit_bn(self.fc(x)).reshape(p, g)


class V2Matcher(nn.Module):
  """v2.x ``QAConv``: BN -> one Linear(hw -> 1) on both halves, summed -> BN."""

  def __init__(self, h: int, w: int):
    super().__init__()
    self.bn = nn.BatchNorm1d(1)
    self.fc = nn.Linear(h * w, 1)
    self.logit_bn = nn.BatchNorm1d(1)

  def forward(self, prob, gal):
    x = maxima(prob, gal, probe_first=True)
    p, g, n = x.shape
    hw = n // 2
    x = self.bn(x.reshape(p * g * 2, 1, hw)).reshape(p * g * 2, hw)
    x = self.fc(x).reshape(p * g, 2).sum(dim=1, keepdim=True)
    return self.logit_bn(x).reshape(p, g)


class V2Criterion(nn.Module):
  """v2.x ``ClassMemoryLoss``: the matcher as a submodule, class memory and valid flags."""

  def __init__(self, matcher: V2Matcher, num_classes: int, d: int, h: int, w: int):
    super().__init__()
    self.matcher = matcher
    self.register_buffer("class_memory", torch.zeros(num_classes, d, h, w))
    self.register_buffer("valid_class", torch.zeros(num_classes))

  def match(self, prob, gal):
    return self.matcher(prob, gal)


def focal_loss(logits, targets, valid):
  """docs/method.md §3: per-sample ``sum_c valid_c * -(1 - p_hat)^2 log p_hat``, as the
  official code."""
  onehot = torch.zeros_like(logits).scatter(1, targets[:, None], 1.0)
  bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
  prob = logits.sigmoid()
  weight = torch.where(onehot > 0, 1.0 - prob, prob) ** 2
  return (bce * weight * valid[None, :]).sum(-1)


# ----------------------------------------------------------------------------- weights
def randomize(module: nn.Module, gen: torch.Generator) -> None:
  """Non-trivial random weights: kaiming convs, affine norms away from (1, 0)."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
      if m.bias is not None:
        nn.init.uniform_(m.bias, -0.1, 0.1, generator=gen)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
      nn.init.uniform_(m.weight, 0.5, 1.5, generator=gen)
      nn.init.uniform_(m.bias, -0.2, 0.2, generator=gen)
    elif isinstance(m, nn.Linear):
      nn.init.uniform_(m.weight, -1.0 / m.in_features**0.5, 1.0 / m.in_features**0.5, generator=gen)
      nn.init.uniform_(m.bias, -0.5, 0.5, generator=gen)


@torch.no_grad()
def calibrate(module: nn.Module, run, batches) -> None:
  """Running BN statistics that fit the activations (a cumulative average over ``batches``
  train-mode passes), so eval-mode outputs are well scaled rather than exploding."""
  bns = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None
  module.train()
  for x in batches:
    run(x)
  for m in bns:
    m.momentum = 0.1  # back to PyTorch's default for the train-mode outputs below
  module.eval()


def state_arrays(module: nn.Module, prefix: str = "") -> dict:
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def count(module: nn.Module, skip=("layer4.", "fc.")) -> tuple[int, int]:
  """(parameter values, running-stat values) the converter must map: everything but the
  unused layer4 / ImageNet classifier and ``num_batches_tracked``."""
  used = lambda k: not any(k.startswith(s) or f".{s}" in k for s in skip)
  params = sum(p.numel() for k, p in module.named_parameters() if used(k))
  buffers = sum(
    b.numel()
    for k, b in module.named_buffers()
    if used(k) and k.endswith(("running_mean", "running_var"))
  )
  return params, buffers


def images(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
  """Random images in [0, 1], NCHW, on the 1/255 grid: stored as uint8 (NHWC) in the
  fixture, so both sides rebuild bit-identical float32 inputs as ``u8 / 255``."""
  return torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8).float() / 255


def as_u8(x: torch.Tensor) -> np.ndarray:
  return np.round(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- cases
def backbone_case(
  out: str, name: str, depth: int, width: int, ibn: str, stages: int, seed: int, train_check: bool
) -> None:
  gen = torch.Generator().manual_seed(seed)
  net = ResNet(depth, width, ibn, stages)
  randomize(net, gen)
  calibrate(net, net, [images(gen, 8, 64, 32) for _ in range(3)])
  x = images(gen, 4, 64, 32)
  with torch.no_grad():
    outs = net(x)
  io = {"input/images_u8": as_u8(x)}
  io.update({f"torch/{k}": v.numpy() for k, v in outs.items()})
  io["count/params"], io["count/buffers"] = map(np.asarray, count(net))
  state = state_arrays(net)
  if train_check:  # one train-mode pass: batch statistics and the running-stat updates
    net.train()
    with torch.no_grad():
      io["torch/train/layer3"] = net(x)["layer3"].numpy()
    io.update(
      {
        f"after/{k}": v
        for k, v in state_arrays(net).items()
        if k.endswith(("running_mean", "running_var"))
      }
    )
  save(out, name, state, io)


def official_case(
  out: str,
  name: str,
  depth: int,
  width: int,
  ibn: str,
  stages: int,
  neck: int,
  version: str,
  seed: int,
) -> None:
  gen = torch.Generator().manual_seed(seed)
  kind, _ = ARCHS[depth]
  base = ResNet(depth, width, ibn, stages)
  channels = width * 4 * (1 if kind == "basic" else 4)
  model = ResMap(base, channels, neck, "v1" if version == "v1" else "v2.1")
  size, num_classes = (80, 48), 10
  h, w = size[0] // 16, size[1] // 16
  if version == "v1":
    criterion = V1Criterion(num_classes, neck, h, w)
  else:
    criterion = V2Criterion(V2Matcher(h, w), num_classes, neck, h, w)
  randomize(model, gen)
  randomize(criterion, gen)
  if version == "v2":  # the official init: weight 1/hw (randomized a little around it)
    with torch.no_grad():
      criterion.matcher.fc.weight.uniform_(0.5 / (h * w), 1.5 / (h * w), generator=gen)
  calibrate(model, model, [images(gen, 8, *size) for _ in range(3)])
  with torch.no_grad():
    criterion.class_memory.copy_(model(images(gen, num_classes, *size)))
    criterion.valid_class.fill_(1.0)
    criterion.valid_class[[2, 7]] = 0.0  # classes not yet seen (v1.1+ valid flags)
    feats = [model(images(gen, 6, *size)) for _ in range(3)]
  calibrate(criterion, lambda f: criterion.match(f, criterion.class_memory), feats)
  state = {
    **state_arrays(model, "model/"),
    **state_arrays(criterion, "criterion/"),
    "epoch": np.asarray(60),
  }  # written before the train-mode pass below changes it

  x = images(gen, 6, *size)
  targets = torch.tensor([0, 3, 3, 7, 9, 1])
  with torch.no_grad():
    features = model(x)
    eval_logits = criterion.match(features, features)
    criterion.train()
    train_logits = criterion.match(features, criterion.class_memory)
    loss = focal_loss(train_logits, targets, criterion.valid_class)
  io = {
    "input/images_u8": as_u8(x),
    "input/targets": targets.numpy(),
    "torch/features": features.numpy(),
    "torch/eval_logits": eval_logits.numpy(),
    "torch/train_logits": train_logits.numpy(),
    "torch/loss": loss.numpy(),
  }
  io.update(
    {
      f"after/{k}": v
      for k, v in state_arrays(criterion).items()
      if k.endswith(("running_mean", "running_var"))
    }
  )
  pm, bm = count(model)
  pc, bc = count(criterion, skip=())  # the head's own fc is used
  io["count/params"], io["count/buffers"] = np.asarray(pm + pc), np.asarray(bm + bc)
  save(out, name, state, io)


def save(out: str, name: str, state: dict, io: dict) -> None:
  np.savez_compressed(os.path.join(out, f"{name}.state.npz"), **state)
  np.savez_compressed(os.path.join(out, f"{name}.io.npz"), **io)
  size = sum(os.path.getsize(os.path.join(out, f"{name}.{p}.npz")) for p in ("state", "io"))
  print(f"{name}: {len(state)} state entries, {size / 1e3:.0f} kB")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures", "parity"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)  # deterministic reductions
  backbone_case(args.out, "resnet18_w4", 18, 4, "", 4, seed=1, train_check=False)
  backbone_case(args.out, "resnet50_ibn_a_w8", 50, 8, "a", 3, seed=2, train_check=True)
  backbone_case(args.out, "resnet18_ibn_b_w8", 18, 8, "b", 3, seed=3, train_check=True)
  official_case(args.out, "qaconv_v1_r18_w4", 18, 4, "", 4, neck=16, version="v1", seed=4)
  official_case(args.out, "qaconv_v2_r50_ibn_b_w4", 50, 4, "b", 3, neck=16, version="v2", seed=5)


if __name__ == "__main__":
  main()
