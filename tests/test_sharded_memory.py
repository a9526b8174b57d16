"""The class memory split over devices for any class count (docs/method.md §3, §11).

7 classes on 4 simulated devices (memory padded to 8 rows, 2 per device) must train like
1 device, and the compiled step must never gather the whole memory.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.losses import memory_accuracy
from qaconv_jax.memory import pad_class_memory, real_class_mask
from qaconv_jax.models.norm import BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sharded") / "out.json")
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
    # The suite's persistent compilation cache (tests/conftest.py), for re-runs.
    "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".cache", "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "sharded_memory_worker.py"), out],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_seven_classes_on_four_devices_train_like_one(four_devices):
  assert four_devices["devices"] == 4 and four_devices["memory_rows"] == [7, 7]
  assert four_devices["relative_l2"] < 1e-4
  for one, four in zip(four_devices["metrics_1"], four_devices["metrics_4"]):
    for k in ("loss", "accuracy", "grad_norm"):
      assert four[k] == pytest.approx(one[k], rel=1e-4), k


def test_compiled_step_never_gathers_the_class_memory(four_devices):
  assert four_devices["gathers_split"] == []
  # The check itself sees a gather when the matcher ignores the split.
  assert four_devices["gathers_naive"], "the HLO inspection found nothing to catch"


def test_padding_rows_are_invalid_and_masked():
  memory, valid = jnp.ones((7, 2, 1, 3)), jnp.ones((7,), bool)
  padded, pvalid = pad_class_memory(memory, valid, 4)
  assert padded.shape == (8, 2, 1, 3) and not bool(pvalid[7]) and float(padded[7].sum()) == 0
  assert pad_class_memory(memory, valid, 7)[0] is memory
  assert real_class_mask(7, 7) is None
  np.testing.assert_array_equal(real_class_mask(8, 7), [True] * 7 + [False])
  # A padding column that would win the argmax is not a prediction.
  logits = jnp.asarray([[0.0, 1.0, 5.0], [2.0, 0.0, 9.0]])
  assert float(memory_accuracy(logits, jnp.asarray([1, 0]))) == 0.0
  assert float(memory_accuracy(logits, jnp.asarray([1, 0]), jnp.asarray([True, True, False]))) == 1


def test_masked_batch_norm_statistics_ignore_masked_entries(rng):
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0], bool)[None, :, None]  # [1, g, 1]
  bn = BatchNorm(scalar=True)
  variables = bn.init(jax.random.key(0), x, False)
  y, upd = bn.apply(variables, jnp.asarray(x), True, jnp.asarray(mask), mutable=["batch_stats"])
  kept = x[:, mask[0, :, 0]].astype(np.float64)  # the float64 reference on the kept columns
  mean, var = kept.mean(), kept.var()
  np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
  unbiased = var * kept.size / (kept.size - 1)
  np.testing.assert_allclose(float(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(float(upd["batch_stats"]["var"]), 0.9 + 0.1 * unbiased, rtol=1e-5)
