"""train.py / train_and_evaluate: artifacts, exact resume, devices, processes, guards."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax import checkpoint
from qaconv_jax.evaluation import testset
from qaconv_jax.training import train_and_evaluate
from tests.runs import checkpoint_leaves, tiny_run_config

_REAL_EVALUATE_TESTSET = testset.evaluate_testset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  return tiny_run_config(get_config, **overrides)


_leaves = checkpoint_leaves


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 steps in one go (the reference for the resume and device tests)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_and_evaluate(_cfg(max_steps=6), workdir)
  return workdir


def test_run_writes_checkpoints_metrics_and_config(straight_run):
  steps = sorted(int(d) for d in os.listdir(checkpoint.checkpoint_dir(straight_run)) if d.isdigit())
  assert steps == [4, 6]  # every 2 steps, keep 2
  with open(os.path.join(straight_run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
  assert rows[0]["lr"] == pytest.approx(0.1)
  with open(os.path.join(straight_run, "config.json")) as f:
    assert json.load(f)["model"]["depth"] == 18
  assert any(
    f.startswith("events.out.tfevents")
    for f in os.listdir(os.path.join(straight_run, "tensorboard"))
  )


def test_interrupted_and_resumed_run_equals_straight_run(straight_run, tmp_path):
  workdir = str(tmp_path)
  first = train_and_evaluate(_cfg(max_steps=3), workdir)
  assert first["step"] == 3 and checkpoint.restore_latest(workdir)[0] == 3
  train_and_evaluate(_cfg(max_steps=6), workdir)
  step_a, resumed = _leaves(workdir)
  step_b, straight = _leaves(straight_run)
  assert step_a == step_b == 6 and resumed.keys() == straight.keys()
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_nan_stops_cleanly_keeping_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"step 4.*last good checkpoint \(step 2\)"):
    train_and_evaluate(_cfg(debug_nan_step=3), workdir)
  step, leaves = _leaves(workdir)
  assert step == 2 and all(np.isfinite(v).all() for v in leaves.values() if v.dtype.kind == "f")


def test_resume_with_another_model_names_the_mismatch(straight_run, tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_cfg(max_steps=2), workdir)
  with pytest.raises(checkpoint.CheckpointMismatch, match="neck_dim: checkpoint 32 vs config 16"):
    train_and_evaluate(_cfg(max_steps=4, **{"model.neck_dim": 16}), workdir)


def test_resume_accepts_other_runtime_knobs_and_names_only_weight_settings(tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_cfg(max_steps=2), workdir)
  knobs = {"model.match_block": (2, 4), "model.dtype": "bfloat16"}  # speed/rounding only
  assert train_and_evaluate(_cfg(max_steps=3, **knobs), workdir)["step"] == 3
  with pytest.raises(checkpoint.CheckpointMismatch) as e:
    train_and_evaluate(_cfg(max_steps=4, **knobs, **{"model.width": 8}), workdir)
  assert "width: checkpoint 16 vs config 8" in str(e.value)
  assert "dtype" not in str(e.value) and "match_block" not in str(e.value)


def _train_py(workdir, devices, extra=(), max_steps=2):
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
  }
  cmd = [
    sys.executable,
    "train.py",
    "--config",
    "configs/default.py:tiny",
    "--workdir",
    workdir,
    f"--config.max_steps={max_steps}",
    "--config.eval.testsets=",
    *extra,
  ]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  return out


def _two_processes(workdir, max_steps=2):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
    _train_py(
      workdir,
      2,
      [
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      max_steps,
    )
    for i in range(2)
  ]
  return [_finish(p) for p in procs]


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four"))
  # --verbosity=0 brings the libraries' INFO logs back (quiet by default: see test_eval).
  out = _finish(_train_py(workdir, 4, ["--verbosity=0"]))
  assert "4 device(s) on 1 process(es)" in out
  assert re.search(r"^I\d{4} .*checkpoint", out, re.M | re.I), out[-3000:]
  return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two"))
  outs = _two_processes(workdir)
  assert "4 device(s) on 2 process(es)" in outs[0]
  return workdir


def test_four_devices_match_one_device(four_device_run, tmp_path):
  # Two steps: from scratch at lr 0.1 float-order differences grow step by step, and
  # qaconv/bn/bias and fc/bias have an exactly-zero gradient (train-mode logit_bn removes
  # any constant logit shift), so they hold rounding noise (measured: <= 5e-5 after 2
  # steps). A sharding bug (e.g. per-device BN statistics) differs by ~0.1.
  train_and_evaluate(_cfg(max_steps=2), str(tmp_path))
  _, one = _leaves(str(tmp_path))
  _, four = _leaves(four_device_run)
  for k in one:
    np.testing.assert_allclose(four[k], one[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_two_processes_match_one_process(four_device_run, two_process_run):
  _, two = _leaves(two_process_run)
  _, four = _leaves(four_device_run)
  for k in four:  # cross-process (gloo) reductions add in another order: float tolerance
    np.testing.assert_allclose(two[k], four[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_resume_on_another_number_of_processes(four_device_run, two_process_run, tmp_path):
  # The same 4 devices throughout; only the number of processes holding them changes at the
  # step-2 checkpoint. Each resume is compared with the same checkpoint continued on its own
  # topology: measured within 1.3e-6 (the arithmetic barely depends on the process count),
  # while replaying batches 1-2 instead of reading 3-4 moves the state by ~0.7. (Comparing
  # with the other topology's own step-2 checkpoint would not do: its 5e-5 float-order
  # difference grows to ~3e-3 in two steps from scratch at lr 0.1.)
  runs = {n: str(tmp_path / n) for n in ("one", "one_to_two", "two", "two_to_one")}
  for name, src in (
    ("one", four_device_run),
    ("one_to_two", four_device_run),
    ("two", two_process_run),
    ("two_to_one", two_process_run),
  ):
    shutil.copytree(src, runs[name])
  assert "resumed from" in _finish(_train_py(runs["one"], 4, max_steps=4))
  assert "at step 2" in _finish(_train_py(runs["two_to_one"], 4, max_steps=4))
  assert "4 device(s) on 2 process(es)" in _two_processes(runs["one_to_two"], max_steps=4)[0]
  _two_processes(runs["two"], max_steps=4)
  for resumed, same_topology in (("one_to_two", "one"), ("two_to_one", "two")):
    step, got = _leaves(runs[resumed])
    _, want = _leaves(runs[same_topology])
    assert step == 4
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f"{resumed}: {k}")


class _Crash(Exception):
  pass


def _scripted_validation(monkeypatch, maps):
  """The real validation, with its mAP replaced by ``maps`` in call order (``_Crash``: the
  process dies during that validation)."""
  real, calls = _REAL_EVALUATE_TESTSET, iter(maps)

  def fake(*args, **kwargs):
    out = real(*args, **kwargs)
    value = next(calls)
    if value is _Crash:
      raise _Crash()
    out["results"]["QAConv"]["mAP"] = value
    return out

  monkeypatch.setattr(testset, "evaluate_testset", fake)  # validate() looks it up per call


def _val_cfg(**overrides):
  # 8 synthetic training identities: 2 held out for validation, 6 trained on (P x K = 4 x 2),
  # 1 step per epoch, 6 steps; validation at steps 2, 4, 6; checkpoints at 2, 4, 6.
  return _cfg(
    eval_every=2,
    **{"data.val_ids": 2.0, "data.batch_size": 8, "checkpoint.keep_best": True},
    **overrides,
  )


def _best_steps(workdir):
  best = checkpoint.manager(os.path.join(workdir, "best"), max_to_keep=1, best_metric="val_mAP")
  try:
    return best.all_steps()
  finally:
    best.close()


def test_validation_split_keeps_the_best_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  _scripted_validation(monkeypatch, [10.0, 30.0, 20.0])  # step 2 kept, then replaced by 4
  out = train_and_evaluate(_val_cfg(), workdir)
  assert out["step"] == 6 and out["val"]["mAP"] == 20.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(line) for line in f if '"kind": "val"' in line]
  assert [(r["step"], r["mAP"]) for r in val] == [(2, 10.0), (4, 30.0), (6, 20.0)]
  assert _best_steps(workdir) == [4]  # Orbax kept the best only
  _, _, meta = checkpoint.restore_with_meta(os.path.join(workdir, "best"))
  assert meta["val_mAP"] == 30.0 and meta["num_classes"] == 6
  assert checkpoint.restore_latest(workdir)[0] == 6  # the final checkpoint stays the default


def test_a_crash_during_validation_loses_no_candidate(tmp_path, monkeypatch):
  # The run dies while validating step 4 (the best step). Validation precedes the step's
  # checkpoint, so the resumed run restarts from step 2 and validates step 4 again.
  workdir = str(tmp_path)
  _scripted_validation(monkeypatch, [10.0, _Crash])
  with pytest.raises(_Crash):
    train_and_evaluate(_val_cfg(), workdir)
  assert checkpoint.restore_latest(workdir)[0] == 2 and _best_steps(workdir) == [2]
  _scripted_validation(monkeypatch, [30.0, 20.0])
  train_and_evaluate(_val_cfg(), workdir)
  assert _best_steps(workdir) == [4]


def test_best_of_another_run_is_refused(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  _scripted_validation(monkeypatch, [10.0, 30.0, 20.0])
  train_and_evaluate(_val_cfg(max_steps=2), workdir)
  shutil.rmtree(checkpoint.checkpoint_dir(workdir))  # a fresh start beside the old best/
  with pytest.raises(
    checkpoint.CheckpointMismatch,
    match=r"best/checkpoints belongs to a run "
    r"with other settings.*data_order.val_seed: checkpoint 0 vs this run 1",
  ):
    train_and_evaluate(_val_cfg(**{"data.val_seed": 1}), workdir)


def test_init_from_another_workdir(straight_run, tmp_path):
  # lr = 0: one step leaves the parameters where init_from put them.
  train_and_evaluate(_cfg(max_steps=1, init_from=straight_run, **{"optim.lr": 0.0}), str(tmp_path))
  _, start = _leaves(straight_run)
  _, fresh = _leaves(str(tmp_path))
  params = [k for k in start if k.startswith("['params']")]
  assert len(params) > 50
  for k in params:
    np.testing.assert_array_equal(fresh[k], start[k], err_msg=k)
  assert checkpoint.restore_latest(str(tmp_path))[0] == 1
