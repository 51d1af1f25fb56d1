"""What a run measured on: the device and jax version, and how loaded the host was."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax


def device_info() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax_version": jax.__version__}


def cpu_model() -> str:
    """The host CPU's model name from ``/proc/cpuinfo``, or ``"unknown CPU"``."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")


def machine_load() -> dict:
    """The 1, 5 and 15 minute load averages next to the CPU count: how busy the host was."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cpu_count": os.cpu_count()}


def load_note(before: dict, after: dict) -> str:
    """One markdown line saying how loaded the host was before and after a measurement."""
    return (f"Host load average (1 min) {before['load_1m']:.1f} before and {after['load_1m']:.1f} after the run, "
            f"on {after['cpu_count']} CPUs (other jobs shared the machine: compare ratios measured in one run, "
            "not absolute times).")


def start_run() -> dict:
    """When a study started and how loaded the host was then; pass it to ``finish_run`` at the end."""
    return {"started": time.perf_counter(), "load_start": os.getloadavg()[0]}


def finish_run(started: dict, **extra) -> dict:
    """The study's ``run_info``: the device (``device_info``), wall seconds since ``start_run``, the 1-minute load
    average at start and end, and any ``extra`` entries."""
    return {"device": device_info(), "wall_seconds": time.perf_counter() - started["started"],
            "load_start": started["load_start"], "load_end": os.getloadavg()[0], **extra}


def machine_line(run_info: dict) -> str:
    """One markdown line from ``finish_run``'s ``run_info``: the device, cores, jax version, the load at start and
    end, and the wall time."""
    device = run_info["device"]
    return (f"Machine: {device['device_kind']}, {device['cpu_count']} cores, jax {device['jax_version']}; load "
            f"average {run_info['load_start']:.1f} at start, {run_info['load_end']:.1f} at end (shared with other "
            f"jobs; compare ratios within this run); {run_info['wall_seconds'] / 60:.1f} min.")
