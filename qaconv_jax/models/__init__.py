"""Flax linen modules: backbone, neck, matcher."""
