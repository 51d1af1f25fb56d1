"""One process of the multi-host test: ``python -m tests.parallel.multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT``.

Each process owns ``--xla_force_host_platform_device_count`` CPU devices (set by the launcher in
``XLA_FLAGS``), joins the others through ``jax.distributed.initialize`` on localhost with the gloo
CPU collectives, builds one global mesh over every process's devices with ``jax.make_mesh`` (Explicit
axes, JAX's default), and runs LASP-2 (plain, packed with an initial state, and through the linear-state
interface: causal Flow, InLine), and ring attention (forward and gradients, ``shard_map``'s default
``check_vma``) on global arrays built identically in every process. Process 0
writes the gathered results to ``OUT`` (``.npz``) for ``tests/parallel/test_multihost.py`` to compare with a
single-process run of the same code (``multihost_case``).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import masks, parallel
from attnjax.linear import Flow, InLine

SHAPE = dict(B=2, T=32, Hq=4, Hkv=2, D=8)
DECAY = np.array([0.9, 0.8, 0.95, 0.7], np.float32)
FLOW = Flow(chunk_size=4)
INLINE = InLine(feature_map="elu+1")
"""The linear-state mechanisms run through ``lasp2_mechanism_sharded`` (Flow causal, InLine non-causal)."""


def inputs() -> tuple[np.ndarray, ...]:
    """The global q, k, v and a cotangent w, the same in every process (NumPy, seeded)."""
    rng = np.random.default_rng(0)
    B, T, Hq, Hkv, D = (SHAPE[n] for n in ("B", "T", "Hq", "Hkv", "D"))
    shapes = [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)]
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def packed_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Packed-sequence ids ``[B, T]`` (runs crossing the shard boundaries) and an initial state ``[B, Hq, D, D]``."""
    B, T, Hq, D = (SHAPE[n] for n in ("B", "T", "Hq", "D"))
    packed = (np.repeat([[0, 1, 1, 2]], B, 0).repeat(T // 4, 1) + np.arange(B)[:, None]).astype(np.int32)
    return packed, np.random.default_rng(1).standard_normal((B, Hq, D, D)).astype(np.float32)


def multihost_case(mesh: Mesh, arrays) -> dict[str, jax.Array]:
    """LASP-2 (with decay; with packed sequences and an initial state; causal Flow and non-causal InLine through
    ``lasp2_mechanism_sharded``) and causal ring attention on a ``("data", "seq")`` mesh: outputs and gradients
    of ``sum(out * w)`` wrt q, k, v. The same code serves one process or many."""
    decay = jnp.asarray(DECAY)
    packed, state = (jnp.asarray(x) for x in packed_inputs())

    def mechanism(config, causal):
        return lambda q, k, v: parallel.lasp2_mechanism_sharded(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data",
                                                                mechanism=config, causal=causal)

    schemes = {
        "lasp2": lambda q, k, v: parallel.lasp2_sharded(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data",
                                                        decay=decay),
        "lasp2_packed": lambda q, k, v: parallel.lasp2_sharded(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data",
                                                               decay=decay, segment_ids=packed, initial_state=state),
        "ring": lambda q, k, v: parallel.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data",
                                                                mask=masks.Causal()),
        "flow_causal": mechanism(FLOW, True),
        "inline": mechanism(INLINE, False),
    }
    return outputs_and_grads(schemes, *arrays)


def outputs_and_grads(schemes: dict, q, k, v, w) -> dict[str, jax.Array]:
    """``{"name/out": out, "name/dq": ..., "name/dk": ..., "name/dv": ...}`` of ``sum(out * w)`` for every
    ``schemes[name](q, k, v)``, from one compile."""
    def run(q, k, v, w):
        results = {}
        for name, fn in schemes.items():
            def loss(q, k, v, fn=fn):
                out = fn(q, k, v)
                return jnp.sum(out * w), out

            (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
            results[f"{name}/out"] = out
            results.update({f"{name}/d{n}": g for n, g in zip("qkv", grads)})
        return results

    return jax.jit(run)(q, k, v, w)


def global_arrays(mesh: Mesh, host_arrays) -> tuple[jax.Array, ...]:
    """Global arrays sharded ``[data, seq, ...]`` over ``mesh``, each process filling its own shards."""
    sharding = NamedSharding(mesh, P("data", "seq"))
    return tuple(jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for x in host_arrays)


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60)
    devices = np.array(jax.devices())                     # every process's devices, process by process
    per_process = devices.reshape(num_processes, 2, -1)   # [process, data, local]
    order = per_process.transpose(1, 0, 2).reshape(-1)    # [data, (process, local)]: "seq" spans the processes
    mesh = jax.make_mesh((2, devices.size // 2), ("data", "seq"), devices=list(order))   # CPU keeps this order
    assert {d.process_index for d in mesh.devices[0]} == set(range(num_processes)), "seq must span the processes"
    results = multihost_case(mesh, global_arrays(mesh, inputs()))
    gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in results.items()}
    if process_id == 0:
        np.savez(out, num_devices=devices.size, local_devices=jax.local_device_count(), **gathered)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
