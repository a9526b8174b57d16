"""Evaluation: ranking metrics, k-reciprocal re-ranking, TLift, QAConv scoring."""
