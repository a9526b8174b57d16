"""Data: synthetic persons (more to come: real datasets, TFDS builders, grain pipeline)."""
