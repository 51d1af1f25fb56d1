"""Inference-time mechanisms over the modules of ``attnjax.nn``: caches (contiguous, paged, sink + window), cache
compression (SnapKV), attention calibration (ACT, VAR), retrieval loops and generation."""

__all__: list = []
