"""Multi-host on one machine: 2 processes × 4 CPU devices, ``jax.distributed`` on localhost (gloo).

The workers (``tests/parallel/multihost_worker.py``) run LASP-2 (plain, packed with an initial state, causal Flow
and InLine through ``lasp2_mechanism_sharded``) and ring attention on a global
``("data", "seq")`` mesh whose sequence axis spans both processes, so every sequence collective
crosses the process boundary; the gathered outputs and gradients must equal a single-process run of
the same code on 8 devices — which equals the single-device references compared here.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from attnjax import attention, masks
from attnjax.linear import linear_attention
from attnjax.linear.flow import flow_attention_reference
from attnjax.linear.inline import inline_attention_reference
from tests.parallel import multihost_worker
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
PROCESSES, DEVICES_PER_PROCESS = 2, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(out: Path, timeout: float = 240.0) -> None:
    """Start the workers, wait for both; on failure raise with their output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.multihost_worker", str(i), str(PROCESSES), str(port),
                               str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(PROCESSES)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-3000:]}"


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "multihost.npz"
    launch(out)
    got = np.load(out)
    assert int(got["num_devices"]) == PROCESSES * DEVICES_PER_PROCESS
    assert int(got["local_devices"]) == DEVICES_PER_PROCESS

    expected = single_device(*multihost_worker.inputs())
    assert set(expected) == set(got.files) - {"num_devices", "local_devices"}
    for name, value in expected.items():
        assert_close(got[name], value, name=name)


def single_device(q, k, v, w) -> dict:
    """What the sharded schemes compute, from the single-device references (the 8-device results
    equal these: tests/parallel/test_lasp2.py, test_lasp2_family.py and the ring tests)."""
    decay = jnp.asarray(multihost_worker.DECAY)
    packed, state = (jnp.asarray(x) for x in multihost_worker.packed_inputs())
    schemes = {
        "lasp2": lambda q, k, v: linear_attention(q, k, v, decay=decay, implementation="reference"),
        "lasp2_packed": lambda q, k, v: linear_attention(q, k, v, decay=decay, segment_ids=packed,
                                                         initial_state=state, implementation="reference"),
        "ring": lambda q, k, v: attention(q, k, v, mask=masks.Causal(), implementation="reference"),
        "flow_causal": lambda q, k, v: flow_attention_reference(q, k, v, causal=True, eps=multihost_worker.FLOW.eps,
                                                                clamp=multihost_worker.FLOW.clamp),
        "inline": lambda q, k, v: inline_attention_reference(q, k, v,
                                                             feature_map=multihost_worker.INLINE.feature_map),
    }
    return multihost_worker.outputs_and_grads(schemes, q, k, v, w)
