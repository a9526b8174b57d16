"""python -m qaconv_jax.index: a folder of crops -> maps, descriptors and metadata; resumable,
corrupt images skipped, the model recorded (docs/method.md §14)."""

import csv
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from qaconv_jax.data import timestamps
from qaconv_jax.data.filenames import describe_names
from qaconv_jax.errors import ConfigError, DataError, MissingFile, OutputExists
from qaconv_jax.inference import index_build
from qaconv_jax.inference.feature_index import list_images, load_image, open_index
from qaconv_jax.inference.index_build import build_index
from qaconv_jax.inference.trained import load_trained
from tests.runs import cli_env, run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  return run_module(module, *args)


@pytest.fixture(scope="module")
def trained(trained_run):
  return load_trained(trained_run["workdir"])


@pytest.fixture(scope="module")
def folder(trained_run, tmp_path_factory):
  """21 gallery crops (one in a sub-folder), a corrupt .jpg, a crop under a name of no
  known format, and a text file."""
  out = tmp_path_factory.mktemp("crops")
  gallery = sorted(glob.glob(os.path.join(trained_run["root"], "bounding_box_test", "[0-9]*.jpg")))
  for p in gallery[:20]:
    shutil.copy(p, out)
  os.makedirs(out / "more")
  shutil.copy(gallery[20], out / "more")
  shutil.copy(gallery[21], out / "more" / "person.jpg")
  (out / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (out / "notes.txt").write_text("not an image")
  return str(out)


@pytest.fixture(scope="module")
def cli_index(folder, trained_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("idx") / "index")
  proc = _cli(
    "qaconv_jax.index", "--workdir", trained_run["workdir"], "--images", folder, "--out", out,
    "--chunk", "8",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def test_index_holds_maps_descriptors_and_metadata(cli_index, folder, trained):
  out, proc = cli_index
  assert "22 images indexed, 1 skipped" in proc.stdout
  assert "indexing: [" in proc.stderr and "ETA" in proc.stderr  # the progress bar
  index = open_index(out)
  paths = [r["path"] for r in index.records]
  want = [p for p in list_images(folder) if not p.endswith("broken.jpg")]
  assert paths == want and len(want) == 22
  assert index.info["model"]["fingerprint"] == trained.fingerprint
  assert index.maps.dtype == np.float16 and index.maps.shape == (22, 4, 2, 32)
  # The maps are the live model's, to float16 rounding.
  images = np.stack([load_image(p, trained.image_size) for p in want])
  live = np.asarray(trained.embed(images))
  np.testing.assert_allclose(index.maps.astype(np.float32), live, atol=2e-3)
  # Descriptors: the location average of the stored maps, re-normalised (float64 here).
  mean = index.maps.astype(np.float64).mean(axis=(1, 2))
  np.testing.assert_allclose(
    index.descriptors, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6
  )
  # Metadata: parsed Market names; the unknown name has empty cells.
  by_name = {os.path.basename(r["path"]): r for r in index.records}
  assert by_name["person.jpg"] == {
    "path": os.path.join(folder, "more", "person.jpg"),
    "pid": None,
    "camera": None,
    "time": None,
  }
  first = os.path.basename(want[0])
  pid, cam = int(first[:4]), int(first.split("_c")[1][0]) - 1
  assert by_name[first]["pid"] == pid and by_name[first]["camera"] == cam
  assert by_name[first]["time"] > 0
  with open(os.path.join(out, "skipped.csv"), newline="") as f:
    skipped = list(csv.DictReader(f))
  assert [s["path"] for s in skipped] == [os.path.join(folder, "broken.jpg")]
  # The reason names the file and PIL's complaint (no object address: the file is stable).
  assert skipped[0]["reason"] == f"cannot decode image {skipped[0]['path']}: OSError: " + (
    "Truncated File Read"
  )
  assert not os.path.exists(os.path.join(out, "chunks"))


def test_rerun_of_a_complete_index_does_nothing(cli_index, folder, trained_run):
  out, _ = cli_index
  before = os.path.getmtime(os.path.join(out, "maps.npy"))
  proc = _cli(
    "qaconv_jax.index", "--workdir", trained_run["workdir"], "--images", folder, "--out", out,
    "--chunk", "8",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is already complete: nothing to do" in proc.stdout
  assert os.path.getmtime(os.path.join(out, "maps.npy")) == before


def test_interrupted_build_resumes_at_the_first_unfinished_chunk(
  cli_index, folder, trained, tmp_path, monkeypatch
):
  images = list_images(folder)
  out = str(tmp_path / "index")
  real = index_build._write_chunk
  written = []

  def crash_after_two(chunks_dir, c, *rest):
    if len(written) == 2:
      raise KeyboardInterrupt
    real(chunks_dir, c, *rest)
    written.append(c)

  monkeypatch.setattr(index_build, "_write_chunk", crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    build_index(trained, images, out, chunk_size=8)
  assert written == [0, 1]
  with pytest.raises(DataError, match="incomplete"):
    open_index(out)
  monkeypatch.setattr(index_build, "_write_chunk", real)
  summary = build_index(trained, images, out, chunk_size=8)
  assert summary["chunks"] == 3 and summary["chunks_done_before"] == 2
  assert summary["embedded"] == len(images) - 16 and summary["indexed"] == 22
  resumed, straight = open_index(out), open_index(cli_index[0])
  assert resumed.records == straight.records
  np.testing.assert_array_equal(resumed.maps, straight.maps)
  np.testing.assert_array_equal(resumed.descriptors, straight.descriptors)


def test_another_index_in_the_out_folder_is_not_overwritten(cli_index, folder, trained):
  out, _ = cli_index
  images = list_images(folder)
  with pytest.raises(OutputExists, match=r"map_dtype: index 'float16' vs now 'float32'"):
    build_index(trained, images, out, map_dtype="float32", chunk_size=8)
  with pytest.raises(OutputExists, match="images_sha256"):
    build_index(trained, images[:-1], out, chunk_size=8)


def test_bad_image_arguments_are_one_line_errors(trained_run, tmp_path):
  with pytest.raises(MissingFile, match="no image folder, file or glob match"):
    list_images(str(tmp_path / "absent" / "*.jpg"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no image"):
    list_images(str(tmp_path / "empty"))
  proc = _cli(
    "qaconv_jax.index", "--workdir", trained_run["workdir"], "--images",
    str(tmp_path / "empty"), "--out", str(tmp_path / "idx"),
  )  # fmt: skip
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_names_of_the_known_datasets_are_parsed():
  names = [
    "/x/0002_c1s1_000451_03.jpg",  # Market: camera 1, session 1, frame 451
    "/x/0002_c1s2_000100_01.jpg",  # session 2: offset = max frame of session 1 (451)
    "/x/0007_c3_f0046182.jpg",  # Duke
    "/x/0000_000_01_0303morning_0015_0.jpg",  # MSMT17
    "/x/0001_c2_1.png",  # CUHK03
    "/x/0002_c9s1_000451_03.jpg",  # camera 9: no Market camera
    "/x/holiday.jpg",
  ]
  got = describe_names(names)
  assert (got[0].dataset, got[0].pid, got[0].camera) == ("market1501", 2, 0)
  assert got[0].time == pytest.approx(451 / 25.0)
  assert got[1].time == pytest.approx((100 + 451) / 25.0)
  assert (got[2].dataset, got[2].pid, got[2].camera) == ("dukemtmc", 7, 2)
  assert got[2].time == pytest.approx((46182 + timestamps.DUKE_OFFSETS[2]) / 59.94)
  assert (got[3].dataset, got[3].pid, got[3].camera, got[3].time) == ("msmt17", 0, 0, None)
  assert (got[4].dataset, got[4].pid, got[4].camera, got[4].time) == ("cuhk03", 1, 1, None)
  assert got[5].pid is None and got[6].pid is None


def test_index_json_records_the_model(cli_index, trained):
  with open(os.path.join(cli_index[0], "index.json")) as f:
    info = json.load(f)
  assert info["status"] == "complete" and info["map_shape"] == [4, 2, 32]
  assert info["model"]["step"] == trained.step == 2
  assert info["num_images"] == 23 and info["num_indexed"] == 22 and info["num_skipped"] == 1


def _two_processes(workdir, folder, out):
  """``python -m qaconv_jax.index`` as 2 processes of one device each: (returncodes, outputs)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "qaconv_jax.index", "--workdir", workdir, "--images", folder]
      + ["--out", out, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
      + ["--process-id", str(i)],
      cwd=ROOT,
      env=cli_env(devices=1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outs


def test_two_processes_index_like_one(cli_index, folder, trained_run, tmp_path):
  # One chunk, one global batch of 32 rows split over 2 processes: broken.jpg (sorted 21st)
  # is loaded by process 1 only, and process 0, which writes the index, must still skip it.
  out = str(tmp_path / "index")
  codes, outs = _two_processes(trained_run["workdir"], folder, out)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert list_images(folder).index(os.path.join(folder, "broken.jpg")) == 20
  two, one = open_index(out), open_index(cli_index[0])
  assert two.records == one.records
  np.testing.assert_allclose(two.maps.astype(np.float32), one.maps.astype(np.float32), atol=2e-3)
  with open(os.path.join(out, "skipped.csv"), newline="") as f:
    assert [r["path"] for r in csv.DictReader(f)] == [os.path.join(folder, "broken.jpg")]


def test_bfloat16_maps_and_a_name_that_is_not_utf8(folder, trained, tmp_path):
  # A Latin-1 file name (not UTF-8: Python holds it with surrogate escapes) and bfloat16
  # maps, which NumPy stores as raw 2-byte records.
  crops = tmp_path / "crops"
  crops.mkdir()
  images = list_images(folder)[:5]
  for p in images:
    shutil.copy(p, crops)
  latin = os.fsdecode(os.path.join(os.fsencode(str(crops)), b"caf\xe9.jpg"))
  shutil.copy(images[0], latin)
  out = str(tmp_path / "index")
  build_index(trained, list_images(str(crops)), out, map_dtype="bfloat16", chunk_size=4)
  index = open_index(out)
  assert index.maps.dtype == np.dtype("bfloat16") and len(index.maps) == 6
  assert latin in [r["path"] for r in index.records]
  with open(os.path.join(out, "images.txt"), "rb") as f:
    assert b"caf\xe9.jpg" in f.read()
  live = np.asarray(trained.embed(np.stack([load_image(latin, trained.image_size)])))
  row = [r["path"] for r in index.records].index(latin)
  np.testing.assert_allclose(index.maps[row].astype(np.float32), live[0], atol=8e-3)
  from qaconv_jax.inference.search_lib import format_text, rank_index, results_json

  copy = [r["path"] for r in index.records].index(os.path.join(crops, os.path.basename(images[0])))
  for shortlist, top in ((0, 6), (3, 3)):  # a shortlist of 3 holds both (cosine 1)
    ranking = rank_index(trained, index, [latin], top=top, shortlist=shortlist)
    found = dict(zip(ranking.rows[0].tolist(), ranking.distance[0].tolist()))
    assert found[row] == found[copy]  # the same image under two names: the same maps
    assert "caf\ufffd.jpg" in format_text(results_json(index, [latin], ranking, trained))


def test_crash_before_the_image_list_and_leftovers_resume_cleanly(folder, trained, tmp_path):
  images = list_images(folder)[:6]
  out = str(tmp_path / "index")

  def crash(*args):
    raise KeyboardInterrupt

  real = index_build._write_chunk
  index_build._write_chunk = crash
  try:
    with pytest.raises(KeyboardInterrupt):
      build_index(trained, images, out, chunk_size=4)
  finally:
    index_build._write_chunk = real
  # As if the run had died right after index.json: no image list, no chunks, a half file.
  os.remove(os.path.join(out, "images.txt"))
  shutil.rmtree(os.path.join(out, "chunks"))
  open(os.path.join(out, "maps.npy.tmp999"), "w").close()
  summary = build_index(trained, images, out, chunk_size=4)
  assert summary["indexed"] == 6 and not summary["already_complete"]
  assert sorted(os.listdir(out)) == [
    "descriptors.npy",
    "images.txt",
    "index.json",
    "maps.npy",
    "metadata.csv",
    "skipped.csv",
  ]
  os.makedirs(os.path.join(out, "chunks"))  # as if the run had died before removing them
  again = build_index(trained, images, out, chunk_size=4)
  assert again["already_complete"] and not os.path.exists(os.path.join(out, "chunks"))


def test_bad_sizes_and_a_file_as_out_are_refused(folder, trained, tmp_path):
  images = list_images(folder)[:2]
  with pytest.raises(ConfigError, match="batch size 0: expected an integer >= 1"):
    build_index(trained, images, str(tmp_path / "a"), batch_size=0)
  with pytest.raises(ConfigError, match="chunk size -1"):
    build_index(trained, images, str(tmp_path / "a"), chunk_size=-1)
  (tmp_path / "file").write_text("x")
  with pytest.raises(OutputExists, match="is a file, not an index folder"):
    build_index(trained, images, str(tmp_path / "file"))


def test_a_write_failing_on_process_0_stops_every_process(folder, trained_run):
  # Process 0 alone writes; when it cannot, the other process must not wait for it forever.
  codes, outs = _two_processes(trained_run["workdir"], folder, "/proc/qaconv_index_test")
  assert codes == [1, 1], outs
  assert (
    outs[0]
    .strip()
    .splitlines()[-1]
    .startswith("error: preparing /proc/qaconv_index_test failed: [Errno")
  )
  assert outs[1].strip().splitlines()[-1] == (
    "error: preparing /proc/qaconv_index_test failed on process 0 (its output says why)."
  )
