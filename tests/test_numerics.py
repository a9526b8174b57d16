"""Numerics policies (qaconv_jax/numerics.py): every dot and conv of the backbone, neck,
matcher (forward and backward) and TLift carries the policy's precision and dtype, so no
backend default (TF32 on NVIDIA GPUs, one bf16 pass on TPU) decides them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax import numerics
from qaconv_jax.errors import ConfigError
from qaconv_jax.evaluation import tlift
from qaconv_jax.models.model import QAConvModel, build_model

DOTS = ("dot_general", "conv_general_dilated")


def _eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, scan, custom VJP,
  shard_map, pallas_call)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, list | tuple) else (v,):
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)


def _dots(fn, *args):
  return [e for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name in DOTS]


def _precisions(eqn) -> set:
  p = eqn.params.get("precision")
  return set(p) if isinstance(p, tuple) else {p}


@pytest.fixture(scope="module")
def tiny():
  cfg = get_config("tiny")
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, *cfg.data.image_size, 3)))
  model = build_model(cfg.model, numerics="float32")
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), images, train=False)
  return cfg, images.astype(jnp.float32), variables


def _train_loss(model, variables, images):
  memory = model.apply(variables, images, method=QAConvModel.embed, train=False)

  def loss(params):
    (_, logits), _ = model.apply(
      {**variables, "params": params}, images, memory=memory, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(logits)

  return jax.grad(loss), variables["params"]


def test_policies_and_auto():
  assert numerics.resolve("float32").precision == jax.lax.Precision.HIGHEST
  assert numerics.resolve("tf32").precision == jax.lax.Precision.HIGH
  assert numerics.resolve("bfloat16").dtype == jnp.bfloat16
  assert numerics.resolve("auto", "cpu").name == "float32"
  assert numerics.resolve("auto", "gpu").name == numerics.resolve("auto", "tpu").name == "bfloat16"
  with pytest.raises(ConfigError, match="dtype must be one of"):
    numerics.resolve("float16")


@pytest.mark.parametrize("policy", ["float32", "tf32", "bfloat16"])
def test_every_dot_and_conv_of_a_train_step_follows_the_policy(tiny, policy):
  cfg, images, variables = tiny
  want = numerics.resolve(policy)
  model = build_model(cfg.model, numerics=policy)
  grad_fn, params = _train_loss(model, variables, images)
  dots = _dots(grad_fn, params)
  convs = [e for e in dots if e.primitive.name == "conv_general_dilated"]
  assert len(convs) > 20 and len(dots) > len(convs)  # forward and backward of all parts
  assert all(_precisions(e) == {want.precision} for e in dots), policy
  operands = {str(v.aval.dtype) for e in convs for v in e.invars}
  assert operands == {jnp.dtype(want.dtype).name}, operands
  if policy == "bfloat16":  # the matcher's similarity dot too, accumulating in float32
    matcher = [
      e
      for e in dots
      if e.primitive.name == "dot_general"
      and {str(v.aval.dtype) for v in e.invars} == {"bfloat16"}
      and e.params["preferred_element_type"] == jnp.float32
    ]
    assert matcher


def test_pallas_matcher_and_tlift_pin_their_precision(tiny):
  cfg, images, variables = tiny
  cfg = cfg.copy_and_resolve_references()
  cfg.model.match_impl = "pallas"
  model = build_model(cfg.model, numerics="float32")
  maps = model.apply(variables, images, method=QAConvModel.embed, train=False)
  match = lambda p, g: model.apply(variables, p, g, train=False, method=QAConvModel.match)
  dots = _dots(match, maps, maps)
  assert any(e.primitive.name == "dot_general" for e in dots)
  assert all(_precisions(e) == {jax.lax.Precision.HIGHEST} for e in dots)
  # TLift's weight sums
  args = (jnp.ones((3, 4)), jnp.zeros(4), jnp.zeros(4), jnp.zeros((1, 4), jnp.int32))
  args += (jnp.zeros((3, 3), jnp.int32), jnp.ones((3, 3), bool))
  lift = lambda *a: tlift._lift(
    *a, k=2, sigma=1.0, alpha=0.2, chunk=2, precision=jax.lax.Precision.HIGHEST
  )
  dots = _dots(lift, *args)
  assert dots and all(_precisions(e) == {jax.lax.Precision.HIGHEST} for e in dots)


def test_bfloat16_scores_stay_close_to_float32(tiny):
  cfg, images, variables = tiny
  out = {}
  for policy in ("float32", "bfloat16"):
    model = build_model(cfg.model, numerics=policy)
    maps = model.apply(variables, images, method=QAConvModel.embed, train=False)
    assert maps.dtype == jnp.float32  # unit maps leave the neck in float32 either way
    out[policy] = np.asarray(
      model.apply(variables, maps, maps, train=False, method=QAConvModel.match)
    )
  diff = np.abs(out["bfloat16"] - out["float32"])
  spread = out["float32"].max() - out["float32"].min()
  assert 0 < diff.max() < 0.05 * spread  # rounded (so bf16 ran), but not another answer
