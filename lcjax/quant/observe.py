"""Calibration hooks, re-exported: the model calls them, so they live in `lcjax.ops.observe`."""

from lcjax.ops.observe import COLLECTIONS, GRAM, STATS, record, record_grouped

__all__ = ["COLLECTIONS", "GRAM", "STATS", "record", "record_grouped"]
