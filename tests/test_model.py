"""Backbone layout vs torchvision, per-channel BN, neck and the full model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qaconv_jax.models.model import Neck, QAConvModel, l2_normalize
from qaconv_jax.models.norm import IBN, BatchNorm, InstanceNorm
from qaconv_jax.models.resnet import ResNet, output_channels, torchvision_key


def torchvision_resnet_shapes(depth: int) -> dict[str, tuple]:
  """state_dict key -> shape of torchvision's resnet{depth}, built from its definition
  (num_batches_tracked omitted: it has no counterpart)."""
  kind, counts = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}[depth]
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (c,)

  bn("bn1", 64)
  inplanes = 64
  for s, count in enumerate(counts):
    planes = 64 * 2**s
    for b in range(count):
      pre = f"layer{s + 1}.{b}"
      if kind == "basic":
        out = planes
        shapes[f"{pre}.conv1.weight"] = (planes, inplanes, 3, 3)
        shapes[f"{pre}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{pre}.bn1", planes)
        bn(f"{pre}.bn2", planes)
      else:
        out = planes * 4
        shapes[f"{pre}.conv1.weight"] = (planes, inplanes, 1, 1)
        shapes[f"{pre}.conv2.weight"] = (planes, planes, 3, 3)
        shapes[f"{pre}.conv3.weight"] = (out, planes, 1, 1)
        bn(f"{pre}.bn1", planes)
        bn(f"{pre}.bn2", planes)
        bn(f"{pre}.bn3", out)
      stride = 2 if (b == 0 and s > 0) else 1
      if b == 0 and (stride != 1 or inplanes != out):
        shapes[f"{pre}.downsample.0.weight"] = (out, inplanes, 1, 1)
        bn(f"{pre}.downsample.1", out)
      inplanes = out
  shapes["fc.weight"] = (1000, inplanes)
  shapes["fc.bias"] = (1000,)
  return shapes


def our_shapes_in_torch_layout(depth: int, final_stage: str) -> dict[str, tuple]:
  model = ResNet(depth=depth, final_stage=final_stage)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 32, 3)), train=False)
  )
  out = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      names = [k.key for k in path]
      shape = leaf.shape
      if len(shape) == 4:  # HWIO -> OIHW
        shape = (shape[3], shape[2], shape[0], shape[1])
      out[torchvision_key(collection, names)] = shape
  return out


@pytest.mark.parametrize("depth, published_total", [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_matches_torchvision_layout(depth, published_total):
  want = torchvision_resnet_shapes(depth)
  fc = {k: want.pop(k) for k in ("fc.weight", "fc.bias")}
  got = our_shapes_in_torch_layout(depth, "layer4")
  assert got == want
  n_params = sum(int(np.prod(s)) for k, s in got.items() if "running" not in k)
  assert n_params + sum(int(np.prod(s)) for s in fc.values()) == published_total
  # QAConv's cut: exactly the keys before layer4.
  cut = our_shapes_in_torch_layout(depth, "layer3")
  assert cut == {k: s for k, s in want.items() if not k.startswith("layer4.")}


def test_resnet50_sample_paths():
  got = our_shapes_in_torch_layout(50, "layer3")
  for key, shape in {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer3.5.bn3.running_var": (1024,),
  }.items():
    assert got[key] == shape
  assert torchvision_key("params", ["layer3_5", "bn3", "scale"]) == "layer3.5.bn3.weight"


def test_resnet_stride_16_and_stages():
  model = ResNet(depth=50)
  x = jnp.zeros((2, 384, 128, 3))
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), x, train=False, return_stages=True)[0]
  )
  assert {k: v.shape for k, v in out.items()} == {
    "stem": (2, 96, 32, 64),
    "layer1": (2, 96, 32, 256),
    "layer2": (2, 48, 16, 512),
    "layer3": (2, 24, 8, 1024),
  }
  assert output_channels(50) == 1024 and output_channels(18) == 256


def test_resnet_errors():
  with pytest.raises(ValueError, match="depth must be one of"):
    ResNet(depth=42).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    ResNet(depth=18).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)), train=False)
  with pytest.raises(ValueError, match="ibn must be one of"):
    ResNet(depth=18, ibn="c").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def _instance_norm_reference(x, scale, bias, eps=1e-5):
  """float64 loops over (sample, channel): biased variance over the h x w plane."""
  x = x.astype(np.float64)
  y = np.empty_like(x)
  for n in range(x.shape[0]):
    for c in range(x.shape[-1]):
      plane = x[n, :, :, c]
      y[n, :, :, c] = (plane - plane.mean()) / np.sqrt(plane.var() + eps) * scale[c] + bias[c]
  return y


def test_instance_norm_and_ibn_match_references(rng):
  x = rng.normal(loc=1.5, scale=2.0, size=(3, 5, 4, 6)).astype(np.float32)
  scale, bias = rng.uniform(0.5, 1.5, 6), rng.uniform(-0.2, 0.2, 6)
  params = {
    "params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  }
  y = InstanceNorm().apply(params, x)  # no running statistics: no train/eval mode
  np.testing.assert_allclose(np.asarray(y), _instance_norm_reference(x, scale, bias), atol=2e-5)
  # IBN: first c // 2 channels instance-normalised, the rest batch-normalised (eval stats).
  ibn = IBN()
  variables = ibn.init(jax.random.key(0), x, train=False)
  assert variables["params"]["IN"]["scale"].shape == (3,)
  assert variables["batch_stats"]["BN"]["mean"].shape == (3,)
  stats = {
    "mean": jnp.asarray(rng.normal(size=3), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
  }
  y = np.asarray(ibn.apply({**variables, "batch_stats": {"BN": stats}}, x, train=False))
  np.testing.assert_allclose(
    y[..., :3], _instance_norm_reference(x[..., :3], [1] * 3, [0] * 3), atol=2e-5
  )
  ref_bn = (x[..., 3:] - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  np.testing.assert_allclose(y[..., 3:], ref_bn, atol=2e-5)


@pytest.mark.parametrize(
  "ibn, expect",
  [
    ("a", {"bn1/scale", "layer1_0/bn1/IN/scale", "layer1_0/bn1/BN/scale", "layer3_1/bn1/IN/scale"}),
    ("b", {"bn1/scale", "layer1_1/IN/scale", "layer2_1/IN/scale"}),
  ],
)
def test_ibn_layouts(ibn, expect):
  """IBN-Net-a: IBN in bn1 of every block of layer1-3; -b: IN stem and an IN after the sum
  in the last block of layer1 and layer2 (ResNet-18: two blocks per stage)."""
  variables = jax.eval_shape(
    lambda: ResNet(depth=18, width=8, ibn=ibn).init(
      jax.random.key(0), jnp.zeros((1, 64, 32, 3)), train=False
    )
  )
  params = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  stats = set(traverse_util.flatten_dict(variables["batch_stats"], sep="/"))
  assert expect <= params
  in_params = {p.rsplit("/", 1)[0] for p in params if p.split("/")[-2] == "IN"}
  if ibn == "a":
    assert len(in_params) == 6 and not any(p.startswith("layer4") for p in in_params)
    assert "bn1/mean" in stats  # the stem keeps its BatchNorm
  else:
    assert in_params == {"layer1_1/IN", "layer2_1/IN"}
    assert "bn1/mean" not in stats  # the stem is an InstanceNorm: no running statistics


def test_channel_batchnorm_matches_pytorch_semantics(rng):
  x = rng.normal(loc=2.0, size=(4, 3, 2, 5)).astype(np.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 5).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(np.asarray(y), ((x - mean) / np.sqrt(var + 1e-5)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
  unbiased = flat.var(0, ddof=1)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * unbiased, rtol=1e-5)


@pytest.mark.parametrize(
  "version, leaves",
  [("v1", {"conv": {"kernel"}, "bn": {"scale", "bias"}}), ("v2.1", {"conv": {"kernel", "bias"}})],
)
def test_neck_versions_and_unit_output(rng, version, leaves):
  x = rng.normal(size=(2, 3, 2, 16)).astype(np.float32)
  neck = Neck(dim=8, version=version)
  variables = neck.init(jax.random.key(0), x, train=False)
  assert {k: set(v) for k, v in variables["params"].items()} == leaves
  y = neck.apply(variables, x, train=False)
  assert y.shape == (2, 3, 2, 8) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, rtol=1e-5)


def test_l2_normalize_zero_vector_stays_finite():
  y = l2_normalize(jnp.zeros((2, 3)))
  assert np.all(np.asarray(y) == 0.0)


def test_bfloat16_compute_keeps_float32_params(rng):
  x = jnp.asarray(rng.uniform(size=(2, 64, 32, 3)), jnp.float32)
  f32 = QAConvModel(depth=18, width=16, neck_dim=16)
  bf16 = QAConvModel(depth=18, width=16, neck_dim=16, dtype=jnp.bfloat16)
  variables = jax.jit(f32.init, static_argnames="train")(jax.random.key(0), x, train=False)
  assert all(
    a.dtype == jnp.float32
    for a in jax.tree.leaves(jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False)))
  )
  embed = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False, method=QAConvModel.embed))
  a, b = embed(f32)(variables, x), embed(bf16)(variables, x)
  assert b.dtype == jnp.float32 and a.shape == b.shape == (2, 4, 2, 16)
  cos = np.sum(np.asarray(a) * np.asarray(b), axis=-1)
  assert cos.min() > 0.98


def test_model_submodules_and_call(rng):
  model = QAConvModel(depth=18, width=8, neck_dim=8, head="v2")
  x = jnp.asarray(rng.uniform(size=(3, 64, 32, 3)), jnp.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"backbone", "neck", "qaconv"}
  memory = jnp.zeros((5, 4, 2, 8))
  feats, logits = jax.jit(lambda v, x, m: model.apply(v, x, memory=m, train=False))(
    variables, x, memory
  )
  assert feats.shape == (3, 4, 2, 8) and logits.shape == (3, 5)


def test_final_stage_layer2_gives_stride_8_maps_and_no_layer3(rng):
  model = QAConvModel(depth=18, width=8, neck_dim=8, final_stage="layer2")
  x = jnp.asarray(rng.uniform(size=(2, 64, 32, 3)), jnp.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  assert not any(k.startswith("layer3") for k in variables["params"]["backbone"])
  assert variables["params"]["neck"]["conv"]["kernel"].shape == (3, 3, 16, 8)  # layer2: 2x8
  feats = model.apply(variables, x, train=False, method=QAConvModel.embed)
  assert feats.shape == (2, 8, 4, 8)  # 64x32 / 8
