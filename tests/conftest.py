"""Test setup: 8 fake CPU devices and unoptimized compiles (set before jax is imported), the ``slow`` marker."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's shapes are tiny, so compiling dominates its time: XLA's backend at -O0 (no expensive LLVM
# passes) takes a third less CPU time overall. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimized build.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
