"""python -m qaconv_jax.search: ranks equal eval.py's, text / JSON / HTML outputs (the page
checked in headless Chromium), and a model other than the index's refused."""

import json
import os
import shutil

import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax.errors import CheckpointMismatch, ConfigError
from qaconv_jax.evaluation.eval_lib import evaluate_checkpoint
from qaconv_jax.inference.feature_index import list_images, open_index
from qaconv_jax.inference.index_build import build_index
from qaconv_jax.inference.search_lib import rank_index, results_json
from qaconv_jax.inference.trained import load_trained
from tests.browser import rendered_images
from tests.runs import run_module, save_untrained_checkpoint


def _cli(*args):
  return run_module("qaconv_jax.search", *args)


@pytest.fixture(scope="module")
def setup(trained_run, tmp_path_factory):
  """The test set's gallery indexed (junk excluded, as eval.py excludes it), its queries."""
  trained = load_trained(trained_run["workdir"])
  root = trained_run["root"]
  out = str(tmp_path_factory.mktemp("search") / "index")
  build_index(trained, list_images(os.path.join(root, "bounding_box_test", "[0-9]*.jpg")), out)
  queries = list_images(os.path.join(root, "query", "[0-9]*.jpg"))
  return trained, open_index(out), queries


def _eval_top10(workdir, **eval_overrides):
  cfg = get_config("tiny")
  cfg.eval.update(map_dtype="float16", **eval_overrides)  # as the index stores its maps
  evaluate_checkpoint(cfg, workdir)
  with open(os.path.join(workdir, "eval", "synthetic_b_top10.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("shortlist", [0, 12])
def test_ranks_equal_eval_py_top_k_lists(setup, trained_run, shortlist):
  trained, index, queries = setup
  overrides = {"shortlist": shortlist, "rerank": False, "tlift": False} if shortlist else {}
  lists = _eval_top10(trained_run["workdir"], **overrides)
  assert [q["query"] for q in lists] == queries
  ranking = rank_index(trained, index, queries, top=10, shortlist=shortlist)
  paths = [[index.records[r]["path"] for r in row] for row in ranking.rows]
  assert paths == [q["QAConv"] for q in lists]
  assert np.all(np.diff(ranking.distance, axis=1) >= 0)


def test_cli_prints_writes_json_and_an_html_page_that_renders(setup, trained_run, tmp_path):
  trained, index, queries = setup
  chosen = queries[:2]
  html, js = str(tmp_path / "report.html"), str(tmp_path / "out.json")
  proc = _cli(
    "--index", index.path, "--workdir", trained_run["workdir"], "--query", *chosen,
    "--top", "4", "--matches", "2", "--json", js, "--html", html,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(js) as f:
    report = json.load(f)
  want = rank_index(trained, index, chosen, top=4)
  assert [q["query"] for q in report["queries"]] == chosen
  for q, item in enumerate(report["queries"]):
    results = item["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert [r["path"] for r in results] == [index.records[r]["path"] for r in want.rows[q]]
    np.testing.assert_allclose([r["distance"] for r in results], want.distance[q], rtol=1e-6)
    assert all(r["camera"] is not None and r["time"] is not None for r in results)
    # The text lists the same ranking: path and distance on each rank's line.
    for r in results:
      assert f"{r['distance']:.6f}" in proc.stdout and r["path"] in proc.stdout
  assert f"2 queries x {len(index.maps)} index images" in proc.stdout
  # 2 queries x (the query + 4 results + 2 correspondence pictures), all decoded.
  assert rendered_images(html) == {"images": 14, "rendered": 14}


def test_json_of_a_shortlisted_search_names_the_shortlist(setup):
  trained, index, queries = setup
  ranking = rank_index(trained, index, queries[:3], top=5, shortlist=7)
  report = results_json(index, queries[:3], ranking, trained)
  assert report["shortlist"] == 7 and report["distance"] == trained.distance
  full = rank_index(trained, index, queries[:3], top=5, shortlist=len(index.maps) + 5)
  exact = rank_index(trained, index, queries[:3], top=5)
  assert results_json(index, queries[:3], full, trained)["shortlist"] == 0
  np.testing.assert_array_equal(full.rows, exact.rows)


def test_top_beyond_the_shortlist_is_refused(setup):
  trained, index, queries = setup
  with pytest.raises(ConfigError, match="--top 10 exceeds --shortlist 5"):
    rank_index(trained, index, queries[:1], top=10, shortlist=5)
  # Exact mode on a small index: --top beyond its size lists all of it.
  everything = rank_index(trained, index, queries[:1], top=len(index.maps) + 3)
  assert sorted(everything.rows[0]) == list(range(len(index.maps)))


def test_an_index_of_another_model_is_refused(setup, trained_run, tmp_path):
  _, index, queries = setup
  other = str(tmp_path / "other")
  save_untrained_checkpoint(get_config("tiny"), other, step=1, seed=1)
  shutil.copy(os.path.join(trained_run["workdir"], "config.json"), other)
  with pytest.raises(CheckpointMismatch, match="was built with another model"):
    rank_index(load_trained(other), index, queries[:1], top=3)
  proc = _cli("--index", index.path, "--workdir", other, "--query", queries[0])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: {index.path} was built with another model")
  )


def test_an_unreadable_query_is_a_one_line_error(setup, trained_run, tmp_path):
  _, index, _ = setup
  bad = tmp_path / "q.jpg"
  bad.write_bytes(b"garbage")
  proc = _cli("--index", index.path, "--workdir", trained_run["workdir"], "--query", str(bad))
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: cannot decode image {bad}: not an image format PIL reads (or a corrupt header)."
  )


def test_report_of_a_gap_model_says_it_has_no_correspondences(setup, trained_run, tmp_path):
  from configs.default import get_config as demo_config
  from qaconv_jax import search

  _, _, queries = setup
  cfg = demo_config("tiny")
  cfg.model.head = "gap"
  gap = str(tmp_path / "gap")
  save_untrained_checkpoint(cfg, gap)
  with open(os.path.join(gap, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort())
  images = list_images(os.path.join(trained_run["root"], "bounding_box_test", "[0-9]*.jpg"))[:6]
  build_index(load_trained(gap), images, str(tmp_path / "index"))
  page = str(tmp_path / "report.html")
  search.main(
    ["--index", str(tmp_path / "index"), "--workdir", gap, "--query", queries[0], "--top", "3"]
    + ["--html", page]
  )
  with open(page, encoding="utf-8") as f:
    text = f.read()
  assert "GAP baseline model: no local matching" in text
  assert text.count("<img ") == 1 + 3 and "local matches" not in text


def test_report_of_a_moved_index_image_is_a_clear_error(tmp_path):
  from qaconv_jax.errors import MissingFile
  from qaconv_jax.inference.report import _thumb

  with pytest.raises(MissingFile, match="keep its images where they were indexed"):
    _thumb(str(tmp_path / "gone.jpg"))
