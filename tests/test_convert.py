"""PyTorch interop: converted fixture state_dicts reproduce PyTorch's outputs (no torch
needed: the fixtures are .npz files written by tools/make_parity_fixtures.py)."""

import collections

import numpy as np
import pytest
from flax import traverse_util

from qaconv_jax import checkpoint, convert
from tests import parity

RTOL = 1e-4  # the bar: within 1e-4 of the tensor's scale, in float32


@pytest.fixture(scope="module", params=parity.BACKBONES + parity.OFFICIAL)
def case(request):
  conv, io, rows = parity.outputs(request.param)
  return request.param, conv, io, rows


def _size(tree) -> int:
  return sum(np.size(v) for v in traverse_util.flatten_dict(tree).values())


def test_outputs_match_pytorch(case):
  name, _, _, rows = case
  assert len(rows) >= 3
  for what, ours, ref in rows:
    assert ours.shape == ref.shape, (name, what)
    err = parity.relative_error(ours, ref)
    assert err <= RTOL, f"{name} {what}: max error {err:.2e} of the tensor's scale"


def test_every_parameter_is_mapped(case):
  name, conv, io, _ = case
  assert _size(conv.variables["params"]) == int(io["count/params"]), name
  assert _size(conv.variables["batch_stats"]) == int(io["count/buffers"]), name


def test_architecture_is_read_off_the_keys():
  expect = {
    "resnet18_w4": dict(depth=18, width=4, ibn=""),
    "resnet50_ibn_a_w8": dict(depth=50, width=8, ibn="a"),
    "resnet18_ibn_b_w8": dict(depth=18, width=8, ibn="b"),
    "qaconv_v1_r18_w4": dict(
      depth=18, width=4, ibn="", final_stage="layer3", neck_dim=16, neck_version="v1", head="v1"
    ),
    "qaconv_v2_r50_ibn_b_w4": dict(
      depth=50, width=4, ibn="b", final_stage="layer3", neck_dim=16, neck_version="v2.1", head="v2"
    ),
  }
  for name, model in expect.items():
    assert convert.convert(parity.load(name)[0]).model == model, name


def test_class_memory_is_converted_to_nhwc():
  state, _ = parity.load("qaconv_v1_r18_w4")
  conv = convert.convert(state)
  torch_memory = state["criterion/class_memory"]  # [C, d, h, w]
  np.testing.assert_array_equal(conv.class_memory, torch_memory.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(conv.memory_valid, state["criterion/valid_class"] > 0.5)
  assert conv.memory_valid.sum() == 8  # two classes were never seen
  assert conv.image_size == (80, 48)  # read off the memory's 5x3 map, not --image_size
  # v1.0 checkpoints have no valid flags: every class counts, as v1.0 trains.
  del state["criterion/valid_class"]
  conv = convert.convert(state)
  assert conv.memory_valid.all() and any("v1.0" in line for line in conv.report)


def test_the_report_says_which_eval_distance_reproduces_the_authors():
  v2 = convert.convert(parity.load("qaconv_v2_r50_ibn_b_w4")[0])
  advice = [line for line in v2.report if line.startswith("evaluation distance")]
  assert len(advice) == 1 and advice[0] == convert.eval_distance_advice(v2.model)
  assert "--config.eval.distance=neg_logit" in advice[0] and "master" in advice[0]
  assert "sigmoid" in advice[0] and "v2.1 tag" in advice[0]
  v1 = convert.convert(parity.load("qaconv_v1_r18_w4")[0])
  advice = [line for line in v1.report if line.startswith("evaluation distance")]
  assert len(advice) == 1 and "--config.eval.distance=sigmoid (the default" in advice[0]
  assert "neg_logit" not in advice[0]
  backbone = convert.convert(parity.load("resnet18_w4")[0])  # nothing to evaluate
  assert not any("evaluation distance" in line for line in backbone.report)
  assert convert.eval_distance_advice(backbone.model) is None


def test_known_unused_entries_are_reported_not_dropped():
  conv = convert.convert(parity.load("qaconv_v1_r18_w4")[0])
  report = "\n".join(conv.report)
  assert "27 tensors of layer4 and the ImageNet classifier" in report
  assert "num_batches_tracked" in report and "60 epochs" in report


@pytest.mark.parametrize(
  "edit, words",
  [
    (
      lambda s: s.update({"layer2.0.conv1.weight": s["layer2.0.conv1.weight"][:, :-1]}),
      ["mis-shaped", "layer2.0.conv1.weight: file [8, 3, 3, 3], model [8, 4, 3, 3]"],
    ),
    (
      lambda s: s.update({"layer2.0.bn1.extra_scale": np.ones(8, np.float32)}),
      ["unexpected", "layer2.0.bn1.extra_scale [8]"],
    ),
    (lambda s: s.pop("layer1.1.bn2.running_var"), ["missing", "layer1.1.bn2.running_var [4]"]),
  ],
)
def test_bad_keys_fail_by_name(edit, words):
  state, _ = parity.load("resnet18_w4")
  edit(state)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert(state)
  for w in words:
    assert w in str(e.value)


def test_unrecognised_or_impossible_files_fail_clearly():
  with pytest.raises(convert.ConversionError, match="unrecognised state_dict"):
    convert.convert({"encoder.weight": np.zeros(3, np.float32)})
  state, _ = parity.load("resnet50_ibn_a_w8")
  cut = {k: v for k, v in state.items() if not k.startswith("layer3.5.")}
  with pytest.raises(convert.ConversionError, match=r"\(3, 4, 5\).*match no ResNet depth"):
    convert.convert(cut)
  state, _ = parity.load("qaconv_v2_r50_ibn_b_w4")
  del state["criterion/class_memory"], state["criterion/valid_class"]
  with pytest.raises(convert.ConversionError, match="give the training --image_size"):
    convert.convert(state, image_size=(384, 128))  # the head was trained on 5x3 maps
  assert convert.convert(state, image_size=(80, 48)).model["head"] == "v2"


def test_unreadable_files_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    convert.read_state_dict(str(tmp_path / "absent.pth"))
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  with pytest.raises(convert.ConversionError, match="could not read .* as .npz"):
    convert.read_state_dict(str(tmp_path / "bad.npz"))


def test_data_parallel_prefix_is_stripped():
  state, _ = parity.load("qaconv_v1_r18_w4")
  wrapped = {k.replace("model/", "model/module.", 1): v for k, v in state.items()}
  a, b = convert.convert(state), convert.convert(wrapped)
  for x, y in zip(
    traverse_util.flatten_dict(a.variables).values(),
    traverse_util.flatten_dict(b.variables).values(),
  ):
    np.testing.assert_array_equal(x, y)


def test_cli_writes_a_checkpoint_that_restores(tmp_path, capsys):
  src = str(parity.FIXTURES / "qaconv_v2_r50_ibn_b_w4.state.npz")
  conv = convert.main(["--from", src, "--to", str(tmp_path)])
  out = capsys.readouterr().out
  assert "eval.py" in out and "--config.eval.distance=neg_logit" in out
  assert convert.eval_distance_advice(conv.model) in out.splitlines()  # printed
  step, state, meta = checkpoint.restore_with_meta(str(tmp_path), model_cfg=conv.model)
  assert step == 0 and meta["model"] == conv.model and meta["num_classes"] == 10
  assert convert.eval_distance_advice(conv.model) in meta["report"]  # and kept
  restored = traverse_util.flatten_dict({c: state[c] for c in conv.variables})
  expected = traverse_util.flatten_dict(conv.variables)
  assert restored.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value)
  np.testing.assert_array_equal(np.asarray(state["class_memory"]), conv.class_memory)
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.main(["--from", src, "--to", str(tmp_path)])


def test_reading_pth_uses_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  state, _ = parity.load("qaconv_v1_r18_w4")
  sections = collections.defaultdict(collections.OrderedDict)
  for k, v in state.items():
    if "/" in k:
      top, key = k.split("/", 1)
      sections[top][key] = torch.from_numpy(v)
  path = tmp_path / "checkpoint.pth.tar"
  torch.save(
    {**sections, "optim": {"state": {}, "param_groups": [{"lr": 0.01}]}, "epoch": 60}, path
  )
  flat, notes = convert.read_state_dict(str(path))
  assert sorted(flat) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(flat[k], state[k])
  assert any("'optim'" in n for n in notes)
  # An arbitrary pickled callable is refused, not run: unpickling would create `marker`.
  marker = tmp_path / "was_run"
  torch.save({"model": _Payload(str(marker))}, tmp_path / "evil.pth")
  with pytest.raises(convert.ConversionError, match="weights_only"):
    convert.read_state_dict(str(tmp_path / "evil.pth"))
  assert not marker.exists()
  (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint" * 8)
  with pytest.raises(convert.ConversionError, match="corrupt or not a PyTorch checkpoint"):
    convert.read_state_dict(str(tmp_path / "corrupt.pth"))


class _Payload:
  """Unpickles as ``open(path, "w")``: a file appears if the unpickler runs it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, "w")


@pytest.fixture(scope="module")
def fresh_state():
  """A train state for the v1 fixture's architecture (ResNet-18 width 4, neck 16)."""
  import jax
  import ml_collections
  import optax

  from qaconv_jax.models.model import QAConvModel
  from qaconv_jax.train_state import create_train_state

  model = QAConvModel(depth=18, width=4, neck_dim=16)
  return create_train_state(
    model,
    optax.sgd(0.1),
    jax.random.key(0),
    (80, 48),
    10,
    ml_collections.ConfigDict({"name": "class_memory", "all_valid": False}),
  )


MODEL_CFG = dict(
  depth=18,
  width=4,
  ibn="",
  final_stage="layer3",
  neck_dim=16,
  neck_version="v1",
  head="v1",
  input_norm="none",
  dtype="float32",
  match_block=(8, 16),
)


def test_init_from_a_converted_backbone(fresh_state, tmp_path):
  src = parity.FIXTURES / "resnet18_w4.state.npz"
  conv = convert.main(["--from", str(src), "--to", str(tmp_path)])
  state, lines = checkpoint.init_from(fresh_state, str(tmp_path), MODEL_CFG)
  flat = traverse_util.flatten_dict(state.params)
  for path, value in traverse_util.flatten_dict(conv.variables["params"]).items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value)
  for path, value in traverse_util.flatten_dict(fresh_state.params).items():
    if path[0] != "backbone":  # neck and head keep their fresh initialisation
      np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value))
  assert "freshly initialised: neck, qaconv" in "\n".join(lines)
  np.testing.assert_array_equal(state.class_memory, fresh_state.class_memory)
  # The converted backbone is width 4: a width-8 config is refused by name.
  with pytest.raises(checkpoint.CheckpointMismatch, match="width: checkpoint 4 vs config 8"):
    checkpoint.init_from(fresh_state, str(tmp_path), {**MODEL_CFG, "width": 8})


def test_init_from_an_official_checkpoint_with_its_memory(fresh_state, tmp_path):
  src = parity.FIXTURES / "qaconv_v1_r18_w4.state.npz"
  conv = convert.main(["--from", str(src), "--to", str(tmp_path)])
  state, lines = checkpoint.init_from(fresh_state, str(tmp_path), MODEL_CFG, with_memory=True)
  assert "freshly initialised" not in "\n".join(lines)
  np.testing.assert_array_equal(np.asarray(state.class_memory), conv.class_memory)
  np.testing.assert_array_equal(np.asarray(state.memory_valid), conv.memory_valid)
  np.testing.assert_array_equal(
    np.asarray(state.params["qaconv"]["fc"]["kernel"]),
    conv.variables["params"]["qaconv"]["fc"]["kernel"],
  )


def test_converted_official_checkpoint_evaluates(tiny_config, tmp_path):
  from qaconv_jax.evaluation.eval_lib import evaluate_checkpoint

  src = parity.FIXTURES / "qaconv_v2_r50_ibn_b_w4.state.npz"
  conv = convert.main(["--from", str(src), "--to", str(tmp_path / "converted")])
  cfg = tiny_config.copy_and_resolve_references()
  cfg.model.update(**conv.model)
  cfg.data.image_size = conv.image_size
  cfg.eval.update(rerank=False, tlift=False)
  cfg.eval.sources.synthetic_b.synthetic_ids = 12
  results = evaluate_checkpoint(cfg, str(tmp_path / "converted"))
  r = results["testsets"]["synthetic_b"]["QAConv"]
  assert 0 < r["mAP"] <= 100 and r["num_valid_queries"] > 0
  # A converted ImageNet backbone alone has no neck or head to evaluate.
  convert.main(
    ["--from", str(parity.FIXTURES / "resnet18_w4.state.npz"), "--to", str(tmp_path / "backbone")]
  )
  cfg.model.update(depth=18, ibn="")
  with pytest.raises(checkpoint.CheckpointMismatch, match="holds no neck or qaconv weights"):
    evaluate_checkpoint(cfg, str(tmp_path / "backbone"))


def test_a_model_cut_after_another_stage_is_refused_by_name():
  flat = dict(parity.load("qaconv_v1_r18_w4")[0])
  flat["model/neck_conv.weight"] = np.zeros((16, 8, 3, 3), np.float32)  # layer2's 8 channels
  with pytest.raises(convert.ConversionError, match="--final_layer other than layer3"):
    convert.convert(flat)
