"""Subprocess side of test_eval_mesh: evaluation on simulated CPU devices and processes.

  python tests/eval_mesh_worker.py MODE OUT.npz [PORT NUM_PROCESSES PROCESS_ID]

MODE: pairwise, testset or two_stage (functions below of those names).

The device count comes from XLA_FLAGS (set by the test). With a port, the process joins a
localhost multi-process run first (before any other JAX call). Writes its arrays to OUT.npz.
"""

import json
import os
import sys

import jax

if len(sys.argv) > 3:
  port, num, index = sys.argv[3:6]
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=int(num), process_id=int(index)
  )

import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from configs.default import get_config  # noqa: E402
from qaconv_jax.data.synthetic import make_identity_set  # noqa: E402
from qaconv_jax.evaluation.eval_lib import lists_fn, model_fns  # noqa: E402
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance  # noqa: E402
from qaconv_jax.evaluation.testset import evaluate_testset  # noqa: E402
from qaconv_jax.models.model import QAConvModel, build_model  # noqa: E402


class Source:
  """In-memory images with pids, cameras, time stamps and names (a random-access source)."""

  def __init__(self, images, pids, cameras, times):
    self.images, self.pids, self.cameras = images, np.asarray(pids), np.asarray(cameras)
    self.times = np.asarray(times, np.float64)
    self.names = [f"img{i}" for i in range(len(images))]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "where": self.names[i]}


def tiny_model():
  """The tiny model with random weights and non-trivial BN statistics (host arrays), so
  eval-mode BN is not the identity."""
  cfg = get_config("tiny")
  model = build_model(cfg.model)
  x = np.zeros((1, *cfg.data.image_size, 3), np.float32)
  variables = jax.device_get(jax.jit(model.init, static_argnames="train")(jax.random.key(0), x))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda a: a + 0.1 * np.abs(rng.normal(size=a.shape)).astype(a.dtype), variables
  )
  return cfg, model, variables


def varied_model():
  """The tiny model with random weights and BN statistics moved both ways (means + noise,
  variances x e^noise), host arrays. `tiny_model`'s all-positive shift maps every image to
  nearly one map (global cosine distances <= 3e-7: shortlists ordered by rounding); here
  they reach 0.03 (median 0.005)."""
  cfg = get_config("tiny")
  model = build_model(cfg.model)
  x = np.zeros((1, *cfg.data.image_size, 3), np.float32)
  variables = jax.device_get(jax.jit(model.init, static_argnames="train")(jax.random.key(0), x))
  rng = np.random.default_rng(0)

  def move(path, a):
    noise = 0.1 * rng.normal(size=a.shape)
    return (a + noise if path[-1].key == "mean" else a * np.exp(noise)).astype(a.dtype)

  stats = jax.tree_util.tree_map_with_path(move, variables["batch_stats"])
  return cfg, model, {**variables, "batch_stats": stats}


def unit_maps(rng, n):
  x = rng.normal(size=(n, 4, 2, 32))
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def pairwise(out):
  """Mesh scoring (several block shapes; partial and closure match functions) and the
  one-device blockwise reference; mesh extraction on every device and on one."""
  cfg, model, variables = tiny_model()
  embed, match = model_fns(model, variables)
  closure = jax.jit(  # the variables as constants: no partial to open
    lambda p, g: model.apply(variables, p, g, train=False, method=QAConvModel.match)
  )
  rng = np.random.default_rng(1)
  probe, gallery = unit_maps(rng, 11), unit_maps(rng, 23)
  ref = np.zeros((11, 23), np.float32)  # the pre-mesh algorithm: blocks on one device
  for i in range(0, 11, 5):
    for j in range(0, 23, 7):
      ref[i : i + 5, j : j + 7] = np.asarray(match(probe[i : i + 5], gallery[j : j + 7]))
  arrays = {"ref_logits": ref}
  for name, fn, block in [
    ("default", match, None),
    ("b4x3", match, (4, 3)),
    ("b1x1", match, (1, 1)),
    ("closure", closure, (3, 5)),
  ]:
    dist, logits = pairwise_distance(fn, probe, gallery, block=block, return_logits=True)
    arrays[f"{name}_dist"], arrays[f"{name}_logits"] = dist, logits
  arrays["plain_dist"] = pairwise_distance(match, probe, gallery, block=(4, 3))
  images, _ = make_identity_set(4, 3, seed=0, size=tuple(cfg.data.image_size))
  src = Source(images, np.zeros(12), np.zeros(12), np.zeros(12))
  one = Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  arrays["maps_all"] = extract_maps(embed, src, cfg.data.image_size, 5)
  arrays["maps_one"] = extract_maps(embed, src, cfg.data.image_size, 5, mesh=one)
  arrays["maps_ref"] = np.asarray(embed(images.astype(np.float32) / 255.0))
  np.savez(out, **arrays)


def _identity_sources(cfg):
  """(query, gallery): 7 identities x 4 images (one query each), 4 cameras, times in 300 s."""
  images, pids = make_identity_set(7, 4, seed=1, size=tuple(cfg.data.image_size))
  is_query = np.arange(len(pids)) % 4 == 0
  cameras = np.arange(len(pids)) % 4
  times = np.random.default_rng(2).uniform(0, 300, len(pids))
  return (Source(images[m], pids[m], cameras[m], times[m]) for m in (is_query, ~is_query))


def testset(out):
  """`evaluate_testset` (re-ranking and TLift on) of 7 identities, 3 gallery images each."""
  cfg, model, variables = tiny_model()
  embed, match = model_fns(model, variables)
  query, gallery = _identity_sources(cfg)
  eval_cfg = cfg.eval.copy_and_resolve_references()
  eval_cfg.update(batch_size=5, memory_budget_gb=2e-5, k1=4, k2=2, tlift_k=3)
  result = evaluate_testset(embed, match, query, gallery, eval_cfg, tuple(cfg.data.image_size))
  arrays = {f"dist/{m}": d for m, d in result["dist"].items()}
  arrays.update(query_maps=result["query_maps"], gallery_maps=result["gallery_maps"])
  arrays["results"] = np.array(json.dumps(result["results"]))
  np.savez(out, **arrays)


def two_stage(out):
  """Two-stage `evaluate_testset` (shortlist K = 8 of 21 gallery images; re-ranking and
  TLift on; the model's own ``match_lists``; float16 maps). Multi-process, the gallery maps
  go to a memory-mapped file of this process's own next to OUT."""
  cfg, model, variables = varied_model()
  embed, match = model_fns(model, variables)
  query, gallery = _identity_sources(cfg)
  eval_cfg = cfg.eval.copy_and_resolve_references()
  # 2 images per device and extraction call on any mesh: the embedding runs the same
  # per-device program whatever the device count, so the float16 maps agree exactly.
  eval_cfg.update(batch_size=2 * jax.device_count(), memory_budget_gb=2e-5)
  eval_cfg.update(k1=7, k2=3, tlift_k=3, shortlist=8, shortlist_far=2, map_dtype="float16")
  gallery_file = None
  if jax.process_count() > 1:
    gallery_file = os.path.join(os.path.dirname(out), f"gallery.p{jax.process_index()}.bin")
  result = evaluate_testset(
    embed,
    match,
    query,
    gallery,
    eval_cfg,
    tuple(cfg.data.image_size),
    lists_fn=lists_fn(model, variables),
    gallery_file=gallery_file,
  )
  assert isinstance(result["gallery_maps"], np.memmap) == (gallery_file is not None)
  assert result["gallery_maps"].dtype == result["query_maps"].dtype == np.float16
  arrays = {}
  for m, d in result["dist"].items():
    assert d.shape == (7, 21) and d.index.shape == (7, 8), (m, d.shape, d.index.shape)
    arrays[f"index/{m}"], arrays[f"values/{m}"] = d.index, d.values
    arrays[f"topk/{m}"] = result["topk"][m]
  arrays.update(query_maps=result["query_maps"], gallery_maps=np.asarray(result["gallery_maps"]))
  for key in ("results", "stats", "notes"):
    arrays[key] = np.array(json.dumps(result[key]))
  np.savez(out, **arrays)


if __name__ == "__main__":
  {"pairwise": pairwise, "testset": testset, "two_stage": two_stage}[sys.argv[1]](sys.argv[2])
