"""Ring attention against the peer ``ringattention`` package's pure-JAX ring, on 8 CPU devices.

Forward + backward (gradients of ``sum(out * w)`` wrt q, k, v) of causal softmax attention with the
sequence sharded over 8 devices (``--xla_force_host_platform_device_count=8``), same shapes, inside
``shard_map``, timed interleaved round by round (``experiments.lib.measure.time_thunks``):

- ``ours/contiguous``: ``attnjax.parallel.ring_attention``, contiguous layout (rank ``r`` holds
  tokens ``[r·C, (r+1)·C)``), causal;
- ``ours/zigzag``: the same with the zigzag layout (causal load balanced);
- ``ours/contiguous/<tile>``: contiguous with the tiles of ``--ours-blocks`` instead of the default
  (``attnjax.parallel.layouts.DEFAULT_BLOCK``, 512, clipped to the local length);
- ``peer``: ``ringattention_jax.ring_attention`` from the ``ringattention`` package (Liu et al.,
  "Ring Attention with Blockwise Transformers", 2023; its pure-JAX ring with blockwise attention,
  causal, contiguous layout, float32 logits), at its best ``--peer-chunks`` query/key chunk size.
  The package's ``__init__`` fails on jax ≥ 0.10, so its ``ringattention_jax`` module is loaded
  directly; the peer is skipped (and said so) when the package is not installed.

Issue 24's target: ours (contiguous, default tiles) at most 0.8× the peer's time at its best chunk.

With ``--lasp2`` the same run also times ``lasp2``: ``attnjax.parallel.lasp2`` (LASP-2, Sun et al. 2025) on the
same shapes, causal Lightning-style linear attention (identity map, ALiBi decay, chunk ``--lasp2-chunk``), the
linear model's sequence-parallel scheme beside the softmax model's ring; and for every path the bytes each device
sends in the compiled forward + backward (``attnjax.parallel.comm.collectives``, loop trip counts included).
Every path's process CPU time per call (all threads) is recorded beside its wall time.

    pip install ringattention einops   # the peer, not a dependency of attnjax
    python -m experiments.bench_ring --seq-lens 8192,16384
    python -m experiments.bench_ring --seq-lens 2048,4096,8192 --lasp2 --ours-blocks "" --name bench_lasp2_vs_ring_cpu
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnjax import masks  # noqa: E402
from attnjax.parallel import comm, lasp2, layouts, ring_attention  # noqa: E402
from attnjax.parallel.sharding import shard_map  # noqa: E402
from experiments.lib import cli, host, report  # noqa: E402
from experiments.lib.measure import time_thunks  # noqa: E402

TARGET = 0.8
"""Issue 24: ring attention (contiguous, causal, fwd+bwd) at most this fraction of the peer's time."""
AXIS = "sp"
SMOKE = {"seq_lens": [256], "heads": 2, "head_dim": 16, "repeats": 1, "peer_chunks": [32], "ours_blocks": [16]}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [8192, 16384], heads=4, head_dim=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--peer-chunks", type=cli.parse_ints, default=[128, 256, 512, 1024],
                   help="query/key chunk sizes tried for the peer (its best is reported)")
    p.add_argument("--ours-blocks", type=cli.parse_ints, default=[128, 256],
                   help="tile sizes of ours timed besides its default (contiguous layout)")
    p.add_argument("--lasp2", action="store_true",
                   help="also time LASP-2 (causal linear attention) on the same shapes, with compiled bytes per device")
    p.add_argument("--lasp2-chunk", type=int, default=64, help="intra-chunk block of LASP-2's chunked linear attention")
    cli.add_output_flags(p, "bench_ring")
    return cli.parse_with_smoke(p, argv, SMOKE)


def load_peer() -> Optional[types.ModuleType]:
    """The peer's ``ringattention_jax`` module, loaded from its file, or None when it is not installed."""
    spec = importlib.util.find_spec("ringattention")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ringattention_jax.py"
    module_spec = importlib.util.spec_from_file_location("ringattention_jax", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def peer_fn(peer: types.ModuleType, chunk: int) -> Callable:
    """The peer's ring on local shards ``[B, C, H, D]``: causal, float32 logits, no dropout."""
    kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0, query_chunk_size=chunk,
                  key_chunk_size=chunk, dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
                  precision=None, prevent_cse=True)
    return lambda q, k, v: peer.ring_attention(q, k, v, None, None, None, AXIS, True, kwargs)


def ours_fn(layout: str, block: Optional[int] = None) -> Callable:
    """``attnjax.parallel.ring_attention`` on local shards, causal, in ``layout`` (tiles: its default, or ``block``)."""
    return lambda q, k, v: ring_attention(q, k, v, axis_name=AXIS, mask=masks.Causal(), layout=layout, block_q=block,
                                          block_kv=block)


def lasp2_fn(chunk: int) -> Callable:
    """``attnjax.parallel.lasp2`` on local shards: causal linear attention, identity map, ALiBi decay (Lightning)."""
    return lambda q, k, v: lasp2(q, k, v, axis_name=AXIS, causal=True, decay="alibi", chunk_size=chunk)


def cpu_timed(thunks: dict) -> tuple[dict, dict]:
    """``(thunks that also record their process CPU time, {name: [seconds per call]})``."""
    cpu = {name: [] for name in thunks}

    def timed(name, thunk):
        def call():
            start = time.process_time()
            out = jax.block_until_ready(thunk())
            cpu[name].append(time.process_time() - start)
            return out
        return call

    return {name: timed(name, thunk) for name, thunk in thunks.items()}, cpu


def fwd_bwd(local: Callable, mesh, w: jax.Array, check_vma: bool = True) -> Callable:
    """Jitted ``(q, k, v) -> (out, dq, dk, dv)`` of ``sum(out * w)`` under ``shard_map`` over the sequence
    (the peer's code predates ``check_vma``'s type checks and runs without them)."""
    spec = P(None, AXIS, None, None)
    sharded = shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=check_vma)

    def loss(q, k, v):
        out = sharded(q, k, v)
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


def run(args: argparse.Namespace) -> list[dict]:
    """One row per T: median seconds per path, the peer's chunk, and ours / peer."""
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    peer = load_peer()
    rows = []
    for T in args.seq_lens:
        keys = jax.random.split(jax.random.PRNGKey(T), 4)
        shape = (args.batch, T, args.heads, args.head_dim)
        q, k, v, w = (jax.random.normal(key, shape, jnp.float32) for key in keys)
        paths = {"ours/contiguous": (fwd_bwd(ours_fn("contiguous"), mesh, w), (q, k, v))}
        zig = [layouts.to_layout(x, "zigzag", jax.device_count(), axis=1) for x in (q, k, v, w)]
        paths["ours/zigzag"] = (fwd_bwd(ours_fn("zigzag"), mesh, zig[3]), tuple(zig[:3]))
        local = T // jax.device_count()
        for block in (b for b in args.ours_blocks if local % b == 0):
            paths[f"ours/contiguous/{block}"] = (fwd_bwd(ours_fn("contiguous", block), mesh, w), (q, k, v))
        peer_chunks = {}
        if peer is not None:
            for chunk in (c for c in args.peer_chunks if local % c == 0):
                paths[f"peer/{chunk}"] = (fwd_bwd(peer_fn(peer, chunk), mesh, w, check_vma=False), (q, k, v))
                peer_chunks[f"peer/{chunk}"] = chunk
        if args.lasp2:
            paths["lasp2"] = (fwd_bwd(lasp2_fn(args.lasp2_chunk), mesh, w), (q, k, v))
        compiled = {name: f.lower(*a).compile() for name, (f, a) in paths.items()}
        thunks, cpu = cpu_timed({name: (lambda c=compiled[name], a=a: c(*a)) for name, (_, a) in paths.items()})
        times = {name: t.median_s for name, t in time_thunks(thunks, repeats=args.repeats).items()}
        cpu_seconds = {name: statistics.median(s[1:] or s) for name, s in cpu.items()}   # warmup round dropped
        row = {"T": T, "seconds": times, "cpu_seconds": cpu_seconds}
        if args.lasp2:
            row["bytes_per_device"] = {name: sum(c.total_sent_bytes for c in comm.collectives(x))
                                       for name, x in compiled.items()}
            row.update(lasp2_over_ring=times["lasp2"] / times["ours/contiguous"],
                       lasp2_over_ring_cpu=row["cpu_seconds"]["lasp2"] / row["cpu_seconds"]["ours/contiguous"])
        if peer_chunks:
            best = min(peer_chunks, key=lambda n: times[n])
            ours_out, peer_out = (compiled[n](*paths[n][1])[0][1] for n in ("ours/contiguous", best))
            tuned = [n for n in times if n.startswith("ours/contiguous/")]
            if tuned:
                fastest = min(tuned, key=lambda n: times[n])
                row.update(tuned_block=int(fastest.rsplit("/", 1)[1]), ratio_tuned=times[fastest] / times[best])
            row.update(peer_chunk=peer_chunks[best], peer_seconds=times[best],
                       max_abs_diff=float(jnp.abs(ours_out - peer_out).max()),
                       ratio_contiguous=times["ours/contiguous"] / times[best],
                       ratio_zigzag=times["ours/zigzag"] / times[best])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict], args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The report: settings, one row per T, the target verdict."""
    peered = [r for r in rows if "peer_seconds" in r]
    table = report.markdown_table(
        ["T", "ours contiguous", "ours zigzag", "peer (best chunk)", "contiguous / peer", "zigzag / peer",
         "best tile of ours / peer", "max |ours − peer| (out)"],
        [[r["T"], f"{1e3 * r['seconds']['ours/contiguous']:.1f} ms", f"{1e3 * r['seconds']['ours/zigzag']:.1f} ms",
          f"{1e3 * r['peer_seconds']:.1f} ms ({r['peer_chunk']})" if "peer_seconds" in r else "not installed",
          f"{r['ratio_contiguous']:.2f}x" if "peer_seconds" in r else "-",
          f"{r['ratio_zigzag']:.2f}x" if "peer_seconds" in r else "-",
          f"{r['ratio_tuned']:.2f}x ({r['tuned_block']})" if "ratio_tuned" in r else "-",
          f"{r['max_abs_diff']:.1e}" if "peer_seconds" in r else "-"] for r in rows])
    if args.lasp2:
        peer_name = {r["T"]: f"peer/{r['peer_chunk']}" for r in peered}
        def mib(r, name):
            return f"{r['bytes_per_device'][name] / 2**20:.2f}" if name in r["bytes_per_device"] else "-"
        table += "\n\n" + report.markdown_table(
            ["T", "ring contiguous", "lasp2", "lasp2 / ring (wall)", "lasp2 / ring (CPU)",
             "ring contiguous MiB/dev", "ring zigzag MiB/dev", "lasp2 MiB/dev", "peer MiB/dev"],
            [[r["T"], f"{1e3 * r['seconds']['ours/contiguous']:.1f} ms", f"{1e3 * r['seconds']['lasp2']:.1f} ms",
              f"{r['lasp2_over_ring']:.2f}x", f"{r['lasp2_over_ring_cpu']:.2f}x", mib(r, "ours/contiguous"),
              mib(r, "ours/zigzag"), mib(r, "lasp2"), mib(r, peer_name.get(r["T"], "-"))] for r in rows])
        table += ("\n\nLASP-2: causal linear attention (identity map, ALiBi decay, intra-chunk block "
                  f"{args.lasp2_chunk}) on the same q, k, v; ring: causal softmax. MiB/device: bytes each device "
                  "sends in the compiled forward + backward (all collectives, loop trip counts included).")
    met = [r for r in peered if r["ratio_contiguous"] <= TARGET]
    verdict = (f"Target (contiguous ≤ {TARGET}× the peer): met at {len(met)} of {len(peered)} lengths."
               if peered else "The peer is not installed: no ratio.")
    return "\n".join([
        f"# Ring attention vs the peer `ringattention` ring ({jax.device_count()} {device['platform']} devices)", "",
        f"jax {device['jax_version']}, {device['cpu_count']} CPUs. B={args.batch}, H={args.heads}, D={args.head_dim}, "
        "float32, causal, forward + backward (gradients of sum(out * w) wrt q, k, v), interleaved rounds, median of "
        f"{args.repeats}.", "", host.load_note(*load), "",
        "CPU times are to be read as ratios only, not as absolute speeds.", "", table, "", verdict, ""])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run; write JSON and markdown; print the table."""
    args = parse_args(argv)
    device, before = host.device_info(), host.machine_load()
    rows = run(args)
    md = markdown(rows, args, device, (before, host.machine_load()))
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "rows": rows}
    report.write_json(results, f"{args.name}.json", Path(args.out))
    (Path(args.out) / f"{args.name}.md").write_text(md)
    return results


if __name__ == "__main__":
    main()
