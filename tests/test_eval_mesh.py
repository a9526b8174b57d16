"""Evaluation on the mesh: every device and every process (the JAX side runs in subprocesses
with simulated CPU devices: tests/eval_mesh_worker.py, train.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join("tests", "eval_mesh_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, devices):
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
    # The suite's persistent compilation cache (conftest.py), for these processes too.
    "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".cache", "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  return out


def _one_and_two_processes(tmp_path, mode: str, one_devices: int) -> list[str]:
  """The worker's ``mode`` as one process of ``one_devices`` devices (writing one.npz) and,
  at the same time, as 2 processes of 2 devices each (two0.npz, two1.npz): their outputs."""
  port = _free_port()
  procs = [_start([WORKER, mode, str(tmp_path / "one.npz")], one_devices)]
  procs += [
    _start([WORKER, mode, str(tmp_path / f"two{i}.npz"), str(port), "2", str(i)], 2)
    for i in range(2)
  ]
  return [_finish(p) for p in procs]


def test_mesh_scoring_and_extraction_equal_one_device(tmp_path):
  # 4 devices; 11 probes x 23 gallery maps (neither divides by 4 nor by the blocks).
  out = str(tmp_path / "pairwise.npz")
  _finish(_start([WORKER, "pairwise", out], 4))
  a = np.load(out)
  ref = a["ref_logits"]  # one device, [5, 7] blocks: the pre-mesh algorithm
  want = 1.0 - 1.0 / (1.0 + np.exp(-ref.astype(np.float64) / 10.0))
  for name in ("default", "b4x3", "b1x1", "closure"):
    assert a[f"{name}_logits"].shape == a[f"{name}_dist"].shape == (11, 23)
    np.testing.assert_allclose(a[f"{name}_logits"], ref, rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(a[f"{name}_dist"], want, rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(a["plain_dist"], a["b4x3_dist"])  # without return_logits
  # 12 images in global batches of 8 over 4 devices, and of 5 on one: the same maps, in
  # source order (each image's map is its own: the one-device embedding of all 12 at once).
  assert a["maps_all"].shape == (12, 4, 2, 32)
  np.testing.assert_allclose(a["maps_all"], a["maps_ref"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a["maps_one"], a["maps_ref"], rtol=1e-5, atol=1e-6)


def test_two_processes_evaluate_a_testset_like_one(tmp_path):
  outs = _one_and_two_processes(tmp_path, "testset", 4)
  assert "query x gallery" in outs[1] and "query x gallery" not in outs[2]  # process 0 shows
  one = np.load(tmp_path / "one.npz")
  methods = json.loads(str(one["results"]))
  assert list(methods) == ["QAConv", "QAConv+TLift", "QAConv+RR", "QAConv+RR+TLift"]
  for i in range(2):
    two = np.load(tmp_path / f"two{i}.npz")
    assert sorted(two.files) == sorted(one.files)
    assert json.loads(str(two["results"])) == methods
    # The same 4 devices run the same programs on the same rows; the gathers only copy.
    for k in one.files:
      np.testing.assert_array_equal(two[k], one[k], err_msg=f"process {i}: {k}")


def test_two_processes_evaluate_two_stage_like_one_device(tmp_path):
  # Shortlists of K = 8 of 21 gallery images, re-ranking (k1 = 7, with pairs scored on
  # demand) and TLift, float16 maps: 2 processes x 2 devices (gallery maps in a memory-mapped
  # file of each process's own) against 1 process x 1 device.
  outs = _one_and_two_processes(tmp_path, "two_stage", 1)
  assert "query shortlists" in outs[1] and "query shortlists" not in outs[2]  # process 0 shows
  one = np.load(tmp_path / "one.npz")
  methods = list(json.loads(str(one["results"])))
  assert methods == ["QAConv", "QAConv+TLift", "QAConv+RR", "QAConv+RR+TLift"]
  stats = json.loads(str(one["stats"]))
  assert stats.pop("seconds") and stats["shortlist"] == 8 and stats["scored_on_demand"] > 0
  for i in range(2):
    assert os.path.getsize(tmp_path / f"gallery.p{i}.bin") == 21 * 4 * 2 * 32 * 2  # float16
    two = np.load(tmp_path / f"two{i}.npz")
    assert sorted(two.files) == sorted(one.files)
    # Every device embeds 2 images per call on both meshes (the worker sizes the batch), so
    # the float16 maps are the same; what follows them runs per device on rows of the same
    # shapes, or on the host. Values could still differ in rounding (a device may reduce
    # in another order), hence allclose; the lists and counts must not.
    for k in ("query_maps", "gallery_maps"):
      np.testing.assert_array_equal(two[k], one[k], err_msg=f"process {i}: {k}")
    for m in methods:
      np.testing.assert_array_equal(two[f"index/{m}"], one[f"index/{m}"], err_msg=f"{i}: {m}")
      np.testing.assert_allclose(
        two[f"values/{m}"], one[f"values/{m}"], rtol=1e-6, atol=1e-6, err_msg=f"{i}: {m}"
      )
      np.testing.assert_array_equal(two[f"topk/{m}"], one[f"topk/{m}"], err_msg=f"{i}: {m}")
    results = json.loads(str(two["results"]))
    assert list(results) == methods
    for m in methods:
      assert results[m] == pytest.approx(json.loads(str(one["results"]))[m], abs=1e-4), m
    two_stats = json.loads(str(two["stats"]))
    assert two_stats.pop("seconds") and two_stats == stats, f"process {i}"
    assert str(two["notes"]) == str(one["notes"])


def test_two_process_training_validates_and_evaluates(tmp_path):
  # 8 synthetic identities, 2 held out; batches of 4 x 2 give 1 step per epoch: 2 steps,
  # validated at both, the test set (6 identities) evaluated at the end.
  workdir = str(tmp_path)
  port = _free_port()
  flags = [
    "train.py",
    "--config",
    "configs/default.py:tiny",
    "--workdir",
    workdir,
    "--config.num_epochs=2",
    "--config.data.val_ids=2.0",
    "--config.data.batch_size=8",
    "--config.eval_every=1",
    "--config.checkpoint.keep_best=True",
    "--config.eval.sources.synthetic_b.synthetic_ids=6",
    "--coordinator_address",
    f"127.0.0.1:{port}",
    "--num_processes",
    "2",
    "--process_id",
  ]
  procs = [_start([*flags, str(i)], 2) for i in range(2)]
  outs = [_finish(p) for p in procs]
  assert "4 device(s) on 2 process(es)" in outs[0]
  assert "step 2: validation rank-1" in outs[0] and "best validation mAP" in outs[0]
  assert "QAConv+RR+TLift" in outs[0]
  assert "validation" not in outs[1] and "QAConv" not in outs[1]  # process 0 alone prints
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 2 and len(results["testsets"]["synthetic_b"]) == 4
  best = os.listdir(os.path.join(workdir, "best", "checkpoints"))
  assert [d for d in best if d.isdigit()] in (["1"], ["2"])
