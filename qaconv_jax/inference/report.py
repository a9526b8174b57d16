"""The search report: one self-contained HTML page (every image embedded as a data URI) with
each query's ranked strip and, for its top matches, the local correspondences QAConv found
(`visualize.match_picture`, the paper's Fig. 1b)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from qaconv_jax.errors import MissingFile
from qaconv_jax.inference.search_lib import shown
from qaconv_jax.visualize import match_picture

THUMB_HEIGHT = 160
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section.query { border-top: 1px solid #ccc; padding: 0.8em 0; }
.strip, .matches { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 10px; max-width: 170px; }
figure img { border: 4px solid #999; display: block; margin: 0 auto 3px; }
figure.query img { border-color: #3c5adc; }
figure.same img { border-color: #28be3c; }
figure.other img { border-color: #dc2828; }
.matches figure { max-width: none; }
.matches figure img { border: 1px solid #ccc; }
figcaption { word-break: break-all; }
table.info td { padding: 0 1em 0 0; font-size: 13px; }
"""


def _data_uri(img: Image.Image, kind: str = "JPEG") -> str:
  buf = io.BytesIO()
  img.save(buf, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
  mime = "image/jpeg" if kind == "JPEG" else "image/png"
  return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumb(path: str) -> str:
  """The image at ``path`` as a JPEG data URI of height `THUMB_HEIGHT`."""
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
  except OSError as e:  # missing, unreadable, or no longer an image
    raise MissingFile(
      f"the report shows every listed image, but {shown(path)} cannot be read ({e}); an index "
      "records absolute paths: keep its images where they were indexed."
    ) from None
  w = max(1, round(im.width * THUMB_HEIGHT / im.height))
  return _data_uri(im.resize((w, THUMB_HEIGHT), Image.BICUBIC))


def _caption(*parts) -> str:
  return "<br>".join(html.escape(str(p)) for p in parts if p not in (None, ""))


def _where(item: dict) -> str:
  cam = "" if item.get("camera") is None else f"camera {item['camera']}"
  t = "" if item.get("time") is None else f"t={item['time']:.1f}s"
  return " ".join(p for p in (cam, t) if p)


def _basename(path: str) -> str:
  return shown(path).replace("\\", "/").rsplit("/", 1)[-1]


def html_report(
  report: dict,
  query_images: list[np.ndarray],
  query_maps: np.ndarray,
  result_images,
  index_maps,
  matches: int,
  notes: tuple[str, ...] = (),
) -> str:
  """The page for ``report`` (`search_lib.results_json`).

  ``query_images``/``result_images(row)``: uint8 ``[H, W, 3]`` as the model saw them (for
  the correspondence pictures); ``query_maps [q, h, w, d]``, ``index_maps [N, h, w, d]``;
  ``matches``: correspondence pictures per query (its best ``matches`` results; 0: none);
  ``notes``: lines shown under the header.
  """
  head = (
    f"<table class='info'><tr><td>index</td><td>{html.escape(report['index'])}</td></tr>"
    f"<tr><td>model</td><td>{html.escape(report['model']['workdir'])} step "
    f"{report['model']['step']} ({report['model']['fingerprint'][:12]})</td></tr>"
    f"<tr><td>distance</td><td>{html.escape(report['distance'])}"
    + (f", shortlist {report['shortlist']}" if report["shortlist"] else "")
    + "</td></tr></table>"
  )
  body = [f"<h1>QAConv search: {len(report['queries'])} queries</h1>", head]
  body += [f"<p class='note'>{html.escape(n)}</p>" for n in [*report["notes"], *notes]]
  for q, item in enumerate(report["queries"]):
    figures = [
      f"<figure class='query'><img alt='query' src='{_thumb(item['query'])}'>"
      f"<figcaption>{_caption('query', _basename(item['query']), _where(item))}"
      "</figcaption></figure>"
    ]
    for r in item["results"]:
      known = item["pid"] is not None and r["pid"] is not None
      kind = ("same" if r["pid"] == item["pid"] else "other") if known else "unknown"
      caption = _caption(f"#{r['rank']}  d={r['distance']:.4f}", _basename(r["path"]), _where(r))
      figures.append(
        f"<figure class='{kind}'><img alt='rank {r['rank']}' src='{_thumb(r['path'])}'>"
        f"<figcaption>{caption}</figcaption></figure>"
      )
    pictures = []
    for r in item["results"][:matches]:
      pic = match_picture(
        query_images[q], result_images(r["row"]), query_maps[q], index_maps[r["row"]]
      )
      pictures.append(
        f"<figure><img alt='matches of rank {r['rank']}' src='{_data_uri(pic, 'PNG')}'>"
        f"<figcaption>local matches, #{r['rank']}</figcaption></figure>"
      )
    body.append(
      f"<section class='query'><h2>{html.escape(_basename(item['query']))}</h2>"
      f"<div class='strip'>{''.join(figures)}</div>"
      + (f"<div class='matches'>{''.join(pictures)}</div>" if pictures else "")
      + "</section>"
    )
  return (
    "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
    f"<title>QAConv search</title><style>{_STYLE}</style></head>"
    f"<body>{''.join(body)}</body></html>\n"
  )
