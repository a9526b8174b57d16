"""python -m qaconv_jax.export and qaconv_jax.exported: StableHLO with a symbolic batch, run
in a process that imports neither Flax nor the model code, equal to the live model."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qaconv_jax.errors import ConfigError, OutputExists
from qaconv_jax.inference.export_lib import export_model
from qaconv_jax.inference.trained import load_trained
from qaconv_jax.models.qaconv import logit_distance
from tests.runs import cli_env, run_module

# Runs in a fresh interpreter: loads the export and writes its outputs, then reports which
# modules got imported.
_SERVE = textwrap.dedent(
  """
  import json, sys
  import numpy as np
  from qaconv_jax import exported

  model = exported.load(sys.argv[1])
  x = np.load(sys.argv[2])
  maps7 = model.embed(x["images"])
  maps1 = model.embed(x["images"][:1])
  out = dict(
    maps7=maps7,
    maps1=maps1,
    d_1x7=model.distance(maps7[:1], maps7),
    d_7x1=model.distance(maps7, maps7[:1]),
    d_blocks=model.distance(maps7, maps7, budget_bytes=1),
  )
  np.savez(sys.argv[3], **out)
  print(json.dumps({
      "flax": "flax" in sys.modules,
      "models": any(m.startswith("qaconv_jax.models") for m in sys.modules),
      "qaconv": sorted(m for m in sys.modules if m.startswith("qaconv_jax")),
      "input_size": list(model.input_size),
  }))
  """
)


@pytest.fixture(scope="module")
def exported_dir(trained_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "model")
  proc = run_module("qaconv_jax.export", "--workdir", trained_run["workdir"], "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checked on cpu: export = live model within" in proc.stdout
  return out


def test_exported_model_runs_without_flax_and_equals_the_live_model(
  exported_dir, trained_run, tmp_path
):
  trained = load_trained(trained_run["workdir"])
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(7, *trained.image_size, 3)).astype(np.float32)
  np.savez(tmp_path / "in.npz", images=images)
  script = tmp_path / "serve.py"
  script.write_text(_SERVE)
  proc = subprocess.run(
    [sys.executable, str(script), exported_dir, str(tmp_path / "in.npz"), str(tmp_path / "out")],
    cwd=str(tmp_path),  # not the repository: the installed package is what a service has
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  modules = json.loads(proc.stdout.strip().splitlines()[-1])
  assert modules["flax"] is False and modules["models"] is False, modules
  assert modules["qaconv"] == ["qaconv_jax", "qaconv_jax.exported"]
  assert modules["input_size"] == list(trained.image_size)
  got = np.load(tmp_path / "out.npz")
  live7 = np.asarray(trained.embed(images))
  live1 = np.asarray(trained.embed(images[:1]))
  np.testing.assert_allclose(got["maps7"], live7, atol=1e-5)
  np.testing.assert_allclose(got["maps1"], live1, atol=1e-5)
  live_d = np.asarray(logit_distance(trained.match(live7, live7), trained.distance))  # [7, 7]
  np.testing.assert_allclose(got["d_1x7"], live_d[:1], atol=1e-5)
  np.testing.assert_allclose(got["d_7x1"], live_d[:, :1], atol=1e-5)
  np.testing.assert_allclose(got["d_blocks"], live_d, atol=1e-5)  # one pair per call


def test_model_json_says_how_to_feed_the_model(exported_dir, trained_run):
  with open(os.path.join(exported_dir, "model.json")) as f:
    info = json.load(f)
  trained = load_trained(trained_run["workdir"])
  assert info["fingerprint"] == trained.fingerprint and info["step"] == 2
  assert info["platforms"] == ["cpu", "cuda"]
  assert (info["input"]["height"], info["input"]["width"]) == trained.image_size
  assert info["input"]["range"] == [0.0, 1.0] and info["input"]["channels"] == "RGB"
  assert info["normalization"].startswith("none") and info["maps"] == {"h": 4, "w": 2, "d": 32}
  assert info["distance"] == "sigmoid" and info["model"]["neck_dim"] == 32
  assert sorted(os.listdir(exported_dir)) == [
    "distance.jax_exported",
    "embed.jax_exported",
    "model.json",
    "weights.npz",
  ]


def test_the_loader_refuses_wrong_shapes(exported_dir):
  from qaconv_jax import exported

  model = exported.load(exported_dir)
  with pytest.raises(ValueError, match=r"images must be \[n, 64, 32, 3\]"):
    model.embed(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"query maps must be \[n, 4, 2, 32\]"):
    model.distance(np.zeros((1, 4, 2, 16)), np.zeros((1, 4, 2, 32)))


def test_existing_output_and_unknown_platforms_are_refused(exported_dir, trained_run, tmp_path):
  trained = load_trained(trained_run["workdir"])
  with pytest.raises(OutputExists, match="pass --overwrite"):
    export_model(trained, exported_dir)
  with pytest.raises(ConfigError, match="platforms \\['metal'\\]"):
    export_model(trained, str(tmp_path / "x"), platforms=("metal",))
  assert not os.path.exists(tmp_path / "x")


def test_overwrite_replaces_an_export_and_nothing_else(exported_dir, trained_run, tmp_path):
  trained = load_trained(trained_run["workdir"])
  target = str(tmp_path / "model")
  shutil.copytree(exported_dir, target)
  os.remove(os.path.join(target, "embed.jax_exported"))  # a damaged earlier export
  info = export_model(trained, target, platforms=("cpu",), overwrite=True)
  assert info["check"]["platform"] == "cpu" and info["check"]["max_abs_diff"] <= 1e-5
  assert "embed.jax_exported" in os.listdir(target) and not glob.glob(f"{target}.*")
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("mine")
  with pytest.raises(OutputExists, match="is not an export"):
    export_model(trained, str(tmp_path / "notes"), overwrite=True)
  assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_gpu_backends_load_under_their_export_platform(exported_dir, monkeypatch):
  # On an NVIDIA machine jax.default_backend() says "gpu"; exports name "cuda".
  from jax import export as jax_export

  from qaconv_jax import exported

  monkeypatch.setattr(jax_export, "default_export_platform", lambda: "cuda")
  assert exported.load(exported_dir).platform == "cuda"
  monkeypatch.setattr(jax_export, "default_export_platform", lambda: "tpu")
  with pytest.raises(RuntimeError, match=r"exported for \['cpu', 'cuda'\], but JAX runs on tpu"):
    exported.load(exported_dir)
