"""Metrics users know: REC accuracy, caption metrics (pycocoevalcap)."""
