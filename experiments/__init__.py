"""Runnable studies and benchmarks of attnjax (``python -m experiments.main``)."""
