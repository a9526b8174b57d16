"""Frame numbers -> seconds for the datasets that have them (docs/method.md §7).

TLift's published numbers depend on these exact rules, quirks included.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

MARKET_FPS = 25.0
MARKET_CAMERAS = 6
MARKET_SESSIONS = 6
DUKE_FPS = 59.94
# Per-camera frame offsets of DukeMTMC-reID, cameras 1..8 (the official synchronisation).
DUKE_OFFSETS = (5542, 3606, 27243, 31181, 0, 22401, 18967, 46765)


def market_session_offsets(frames: Iterable[tuple[int, int, int]]) -> dict[tuple[int, int], int]:
  """Per-(camera, session) frame offsets of Market-1501, the official way.

  Args:
    frames: ``(camera, session, frame)`` of every non-junk image of train, gallery and query
      together; camera and session 1-based as in the file names.

  Returns:
    ``{(camera, session): offset}`` for sessions 1..6 of every camera seen. Session 1 has
    offset 0; for s >= 2, ``offset[s] = maxframe[s-1] + 2 * offset[s-1]`` when the camera
    has images in session s-1, else ``offset[s-1]``. (The official code takes the previous
    session's maximum after shifting it, so its offset counts twice, and an empty session's
    maximum is 0. Kept on purpose: the published TLift results were computed this way.)
  """
  max_frame: dict[tuple[int, int], int] = defaultdict(int)
  cameras = set()
  for cam, session, frame in frames:
    cameras.add(cam)
    max_frame[cam, session] = max(max_frame[cam, session], frame)
  offsets = {}
  for cam in cameras:
    offsets[cam, 1] = 0
    for s in range(2, MARKET_SESSIONS + 1):
      prev = offsets[cam, s - 1]
      if (cam, s - 1) in max_frame:
        offsets[cam, s] = max_frame[cam, s - 1] + 2 * prev
      else:
        offsets[cam, s] = prev
  return offsets


def market_time(
  camera: int, session: int, frame: int, offsets: dict[tuple[int, int], int]
) -> float:
  """Seconds of a Market-1501 image (1-based camera and session).

  Raises:
    ValueError: ``camera`` is outside 1..MARKET_CAMERAS, ``session`` outside
      1..MARKET_SESSIONS, or ``offsets`` has no entry for ``(camera, session)`` (a camera
      that ``market_session_offsets`` never saw).
  """
  if not 1 <= camera <= MARKET_CAMERAS:
    raise ValueError(f"Market-1501 camera {camera} is outside cameras 1..{MARKET_CAMERAS}.")
  if not 1 <= session <= MARKET_SESSIONS:
    raise ValueError(f"Market-1501 session {session} is outside sessions 1..{MARKET_SESSIONS}.")
  if (camera, session) not in offsets:
    seen = sorted({c for c, _ in offsets})
    raise ValueError(
      f"Market-1501 camera {camera} has no session offsets; the offsets hold cameras {seen}."
    )
  return (frame + offsets[camera, session]) / MARKET_FPS


def duke_time(camera: int, frame: int) -> float:
  """Seconds of a DukeMTMC-reID image (1-based camera).

  Raises:
    ValueError: ``camera`` is outside 1..len(DUKE_OFFSETS) (camera 0 would otherwise index
      camera 8's offset from the end).
  """
  if not 1 <= camera <= len(DUKE_OFFSETS):
    raise ValueError(f"DukeMTMC-reID camera {camera} is outside cameras 1..{len(DUKE_OFFSETS)}.")
  return (frame + DUKE_OFFSETS[camera - 1]) / DUKE_FPS
