"""Identity, camera and time of a person crop from its file name, in the known datasets'
formats (docs/method.md §8): what an index of an arbitrary image folder can know of each
image without a dataset layout.

- Market-1501 ``0002_c1s1_000451_03.jpg``: pid, camera, and the time from camera, session and
  frame (the session offsets taken over every Market name given together, as the official
  code takes them over the whole dataset);
- DukeMTMC-reID ``0001_c2_f0046182.jpg``: pid, camera, time (the official camera offsets);
- MSMT17 ``0000_000_01_0303morning_0015_0.jpg``: pid, camera;
- CUHK03 ``0001_c1_1.png``: pid, camera.

Cameras are 0-based, as everywhere in the library; times in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

from qaconv_jax.data import timestamps

MARKET_NAME = re.compile(r"^(-?\d+)_c(\d)s(\d)_(\d+)_(\d+)\.jpg$")
DUKE_NAME = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)\.jpg$")
CUHK03_NAME = re.compile(r"^(-?\d+)_c(\d+)_\d+\.png$")
MSMT17_NAME = re.compile(r"^(\d+)_\d+_(\d+)_\d{4}(?:morning|noon|afternoon)_\d+_\d+\.jpg$")
MSMT17_CAMERAS = 15


@dataclasses.dataclass(frozen=True)
class NameInfo:
  """What a file name says; None where it says nothing (or its format is unknown)."""

  dataset: str | None = None
  pid: int | None = None
  camera: int | None = None  # 0-based
  time: float | None = None  # seconds


def describe_names(paths: Sequence[str]) -> list[NameInfo]:
  """``NameInfo`` of every path's base name (`NameInfo()` for an unknown format or values
  outside the dataset's cameras and sessions: a folder of crops is indexed, not refused)."""
  base = [os.path.basename(p) for p in paths]
  market = [MARKET_NAME.match(b) for b in base]
  market = [m if m and _in_market(m) else None for m in market]
  offsets = timestamps.market_session_offsets(
    (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in market if m
  )
  out = []
  for b, m in zip(base, market):
    if m:
      cam, session, frame = (int(m.group(i)) for i in (2, 3, 4))
      t = timestamps.market_time(cam, session, frame, offsets)
      out.append(NameInfo("market1501", int(m.group(1)), cam - 1, t))
    elif (m := DUKE_NAME.match(b)) and 1 <= int(m.group(2)) <= len(timestamps.DUKE_OFFSETS):
      cam = int(m.group(2))
      t = timestamps.duke_time(cam, int(m.group(3)))
      out.append(NameInfo("dukemtmc", int(m.group(1)), cam - 1, t))
    elif (m := MSMT17_NAME.match(b)) and 1 <= int(m.group(2)) <= MSMT17_CAMERAS:
      out.append(NameInfo("msmt17", int(m.group(1)), int(m.group(2)) - 1))
    elif (m := CUHK03_NAME.match(b)) and int(m.group(2)) >= 1:
      out.append(NameInfo("cuhk03", int(m.group(1)), int(m.group(2)) - 1))
    else:
      out.append(NameInfo())
  return out


def _in_market(m: re.Match) -> bool:
  cam, session = int(m.group(2)), int(m.group(3))
  return 1 <= cam <= timestamps.MARKET_CAMERAS and 1 <= session <= timestamps.MARKET_SESSIONS
