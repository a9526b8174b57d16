"""People walking in groups through a camera network: where synthetic time stamps come from.

Groups (1-4 people) enter at random times and follow a random route of 2-4 cameras; the
transit time between two cameras is a fixed property of the network (plus a little
per-person jitter), so people seen together in one camera are seen together again in the
next one, some tens of seconds to minutes later. That is the premise of TLift.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sighting:
  person: int
  camera: int  # 0-based
  enter: float  # seconds
  leave: float
  group: int


def transit_times(num_cameras: int, rng: np.random.Generator) -> np.ndarray:
  """``[C, C]`` mean walking time in seconds between cameras laid out along a campus path."""
  position = np.sort(rng.uniform(0.0, 1.0, num_cameras)) * 400.0  # metres along the path
  distance = np.abs(position[:, None] - position[None, :])
  return 20.0 + distance / 1.3  # ~1.3 m/s walking speed plus a fixed overhead


def simulate_walks(
  num_people: int, num_cameras: int, rng: np.random.Generator, duration: float = 3600.0
) -> list[Sighting]:
  """Every sighting of ``num_people`` people walking in groups for ``duration`` seconds."""
  transit = transit_times(num_cameras, rng)
  order = rng.permutation(num_people)
  sightings = []
  start, group = 0, 0
  while start < num_people:
    size = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
    members = order[start : start + size]
    start += size
    route = [int(rng.integers(num_cameras))]
    for _ in range(int(rng.integers(2, 5)) - 1):
      route.append(int(rng.choice([c for c in range(num_cameras) if c != route[-1]])))
    t = rng.uniform(0.0, duration * 0.8)
    for i, cam in enumerate(route):
      if i:
        t += transit[route[i - 1], cam] * rng.uniform(0.9, 1.1)
      dwell = rng.uniform(4.0, 12.0)
      for person in members:
        jitter = rng.normal(0.0, 2.0)  # group members walk a few seconds apart
        sightings.append(Sighting(int(person), cam, t + jitter, t + jitter + dwell, group))
      t += dwell
    group += 1
  return sightings
