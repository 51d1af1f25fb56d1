"""Communication report and step-time projection of the sequence-parallel schemes.

Two parts, in one run:

1. **Measured**: each scheme of ``attnjax.parallel`` (ring, all-gather, Ulysses, LASP-2) is compiled
   for one training step (loss and gradients) of a small layer on the local devices (8 fake CPU
   devices by default), and ``attnjax.parallel.comm.collective_bytes`` reads the bytes each device
   sends per collective from the compiled HLO. They are printed beside the cost model's bytes for
   the same shapes (``comm.traffic``), which must agree.
2. **Projected**: ``comm.step_time`` projects the step time of a Linear-Llama3-1B-shaped model (the
   LASP-2 paper's model: 16 layers, d=2048, 32 query / 8 KV heads of 64, FFN 8192) under each
   scheme, for 8 to 1024 devices at a fixed number of tokens per device (weak scaling), at a fixed
   2048K-token sequence (strong scaling), and in the paper's setting (2048K tokens, 64 GPUs), on
   A100- and H100-cluster hardware profiles. It also solves for the inter-node bandwidth at which
   the model reproduces the paper's measured LASP-2 speedup over ring attention (36.6%).

    python -m experiments.comm_model
    python -m experiments.comm_model --devices 8,64,512 --tokens-per-device 65536
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from tqdm import tqdm  # noqa: E402

from attnjax import parallel  # noqa: E402
from attnjax.parallel import comm  # noqa: E402
from experiments.lib import cli, host, plots, report  # noqa: E402

PAPER_TOKENS, PAPER_DEVICES = 2048 * 1024, 64
PAPER_SPEEDUP_OVER_RING = 1.366
"""LASP-2 paper (Sun et al. 2025): 36.6% faster training than Ring Attention, 2048K tokens on 64 GPUs."""

MODEL = dict(layers=16, d_model=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192)
"""Llama-3.2-1B shapes (the LASP-2 paper's Linear-Llama3-1B replaces its attention)."""

HARDWARE = {
    "a100": comm.Hardware("A100 cluster (8/node, NVLink 300 GB/s, 25 GB/s per GPU across nodes, MFU 50%)",
                          flops=0.5 * 312e12, intra_node_bandwidth=300e9, inter_node_bandwidth=25e9, latency=1e-5),
    "h100": comm.Hardware("H100 cluster (8/node, NVLink 450 GB/s, 50 GB/s per GPU across nodes, MFU 50%)",
                          flops=0.5 * 989e12, intra_node_bandwidth=450e9, inter_node_bandwidth=50e9, latency=8e-6),
}
SCHEME_ATTENTION = {"ring": ("linear", "softmax"), "allgather": ("linear", "softmax"),
                    "ulysses": ("linear", "softmax"), "lasp2": ("linear",)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=cli.parse_ints, default=[8, 16, 32, 64, 128, 256, 512, 1024],
                   help="device counts to project")
    p.add_argument("--tokens-per-device", type=int, default=32768, help="weak scaling: tokens per device")
    p.add_argument("--seq-len", type=int, default=PAPER_TOKENS, help="strong scaling: global sequence length")
    p.add_argument("--measure-seq-len", type=int, default=64, help="sequence length of the compiled layers")
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip the compiled-HLO part")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default="comm_model", help="output file stem")
    return p.parse_args(argv)


def workload(seq_len: int, dtype_bytes: int = 2) -> comm.Workload:
    """The attention shapes of ``MODEL`` at ``seq_len`` tokens (bf16 by default)."""
    return comm.Workload(batch=1, seq_len=seq_len, heads=MODEL["heads"], kv_heads=MODEL["kv_heads"],
                         head_dim=MODEL["head_dim"], dtype_bytes=dtype_bytes)


def other_flops_per_token() -> float:
    """Forward + backward FLOPs per token and layer outside attention: ``6 × parameters``."""
    d, hd = MODEL["d_model"], MODEL["head_dim"]
    params = d * hd * (2 * MODEL["heads"] + 2 * MODEL["kv_heads"]) + 3 * d * MODEL["ffn"]
    return 6.0 * params


def measure(seq_len: int) -> list[dict]:
    """Bytes sent per device for one step of each scheme: compiled HLO against the cost model."""
    world = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    B, H, D = 1, world, 16                       # Ulysses needs W | heads
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, w = (jax.random.normal(key, (B, seq_len, H, D), jnp.float32) for key in keys)
    rows = []
    for scheme in tqdm(comm.SCHEMES, desc="compile"):
        if scheme == "lasp2":
            fn = lambda q, k, v: parallel.lasp2_sharded(q, k, v, mesh=mesh, seq_axis="seq")  # noqa: E731
        else:
            fn = lambda q, k, v, s=scheme: parallel.SHARDED[s](q, k, v, mesh=mesh, seq_axis="seq")  # noqa: E731
        step = jax.jit(jax.value_and_grad(lambda q, k, v, w, fn=fn: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))
        compiled = step.lower(q, k, v, w).compile()
        found = comm.collectives(compiled)
        sent = comm.collective_bytes(compiled)
        loss_psum = 2 * (world - 1) * 4 // world          # the scalar loss's all-reduce
        t = comm.traffic(scheme, comm.Workload(B, seq_len, H, H, D, dtype_bytes=4), world,
                         "linear" if scheme == "lasp2" else "softmax")
        rows.append({"scheme": scheme, "world": world, "seq_len": seq_len, "heads": H, "head_dim": D,
                     "hlo_bytes": sent, "hlo_counts": comm.collective_counts(compiled),
                     "collectives": [dataclasses.asdict(c) for c in found],
                     "measured": sum(sent.values()) - loss_psum, "modeled": t.bytes_fwd + t.bytes_bwd})
    return rows


def project(seq_len: int, world: int, hw: comm.Hardware, scheme: str, attention: str) -> dict:
    """One training step of ``MODEL`` under ``scheme`` on ``world`` devices: ``comm.step_time``'s terms, or why
    the scheme cannot run there (``feasible`` False and a ``reason``)."""
    w = workload(seq_len)
    row = {"scheme": scheme, "attention": attention, "world": world, "seq_len": seq_len}
    reason = comm.feasible(scheme, w, world, attention)
    if reason:
        return dict(row, feasible=False, reason=reason)
    t = comm.step_time(scheme, w, world, hw, attention=attention, layers=MODEL["layers"],
                       other_flops_per_token=other_flops_per_token())
    return dict(row, feasible=True, **t)


def projections(args: argparse.Namespace) -> list[dict]:
    """``project`` for every hardware profile, device count, scaling (weak, strong), scheme and attention."""
    rows = []
    for hw_name, hw in HARDWARE.items():
        for world in args.devices:
            for scaling, seq_len in (("weak", args.tokens_per_device * world), ("strong", args.seq_len)):
                for scheme, kinds in SCHEME_ATTENTION.items():
                    for attention in kinds:
                        rows.append(dict(project(seq_len, world, hw, scheme, attention), hardware=hw_name,
                                         scaling=scaling))
    return rows


RANK_TOKENS = (128 * 1024, 512 * 1024, 2048 * 1024)
RANK_DEVICES = (8, 64, 256, 1024)


def ranking(hw: comm.Hardware) -> list[dict]:
    """For each (tokens, devices) in ``RANK_TOKENS × RANK_DEVICES`` and each attention kind: the feasible
    schemes ordered by projected step time (fastest first), with the times."""
    rows = []
    for seq_len in RANK_TOKENS:
        for world in RANK_DEVICES:
            for attention in ("softmax", "linear"):
                runs = [project(seq_len, world, hw, scheme, attention) for scheme, kinds in SCHEME_ATTENTION.items()
                        if attention in kinds]
                order = sorted((r for r in runs if r["feasible"]), key=lambda r: r["step"])
                rows.append({"seq_len": seq_len, "world": world, "attention": attention,
                             "order": [(r["scheme"], r["step"]) for r in order],
                             "infeasible": [r["scheme"] for r in runs if not r["feasible"]]})
    return rows


def break_even_bandwidth(hw: comm.Hardware, speedup: float = PAPER_SPEEDUP_OVER_RING) -> float:
    """Inter-node bytes/s at which ring's step takes ``speedup`` × LASP-2's in the paper's setting."""
    def ratio(bandwidth: float) -> float:
        h = dataclasses.replace(hw, inter_node_bandwidth=bandwidth)
        step = {s: project(PAPER_TOKENS, PAPER_DEVICES, h, s, "linear")["step"] for s in ("ring", "lasp2")}
        return step["ring"] / step["lasp2"]

    lo, hi = 1e8, 1e14
    if ratio(hi) > speedup:
        return float("inf")
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ratio(mid) > speedup else (lo, mid)
    return hi


def fmt_time(seconds: float) -> str:
    """``1.5`` -> ``"1.5 s"``, ``0.0015`` -> ``"1.5 ms"``."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def markdown_report(results: dict, args: argparse.Namespace) -> str:
    """The markdown file: measured bytes, the paper's setting, break-even bandwidths, scaling tables, the model."""
    lines = ["# Sequence parallelism: communication report and step-time model", ""]
    if results["measured"]:
        m = results["measured"][0]
        lines += [f"## Bytes sent per device, one training step, read from the compiled HLO "
                  f"({m['world']} devices, T={m['seq_len']}, {m['heads']} heads of {m['head_dim']}, float32)", "",
                  report.markdown_table(
                      ["scheme", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "HLO total",
                       "cost model", "collectives run"],
                      [[r["scheme"], *(report.format_bytes(r["hlo_bytes"][k]) for k in
                                       ("all-gather", "reduce-scatter", "all-to-all", "collective-permute")),
                        report.format_bytes(r["measured"]), report.format_bytes(r["modeled"]),
                        sum(r["hlo_counts"].values()) - 1] for r in results["measured"]]),
                  "", "HLO total excludes the loss's scalar all-reduce. The cost model uses the same byte formulas "
                  "at every scale below.", ""]
    paper = results["paper"]
    lines += [f"## The paper's setting: {PAPER_TOKENS // 1024}K tokens on {PAPER_DEVICES} GPUs, "
              "Linear-Llama3-1B shapes", ""]
    for hw_name, rows in paper.items():
        lines += [f"**{HARDWARE[hw_name].name}**", "",
                  report.markdown_table(
                      ["scheme", "attention", "step", "comm (sum)", "compute", "bytes/device", "tokens/s",
                       "LASP-2 speedup"],
                      [[r["scheme"], r["attention"], *((fmt_time(r["step"]), fmt_time(r["comm"]),
                                                        fmt_time(r["compute"]), report.format_bytes(r["bytes"]),
                                                        f"{r['tokens_per_s']:.3g}",
                                                        f"{r['lasp2_speedup']:.2f}x" if "lasp2_speedup" in r else "")
                                                       if r["feasible"] else (r["reason"], "", "", "", "", ""))]
                       for r in rows]), ""]
    lines += ["Break-even: the inter-node bandwidth per GPU at which this model gives LASP-2 the paper's measured "
              f"{(PAPER_SPEEDUP_OVER_RING - 1) * 100:.1f}% speedup over ring attention (linear attention, "
              "paper setting):", ""]
    for hw_name, bw in results["break_even_bandwidth"].items():
        lines.append(f"- {hw_name}: {bw / 1e9:.3g} GB/s (profile: "
                     f"{HARDWARE[hw_name].inter_node_bandwidth / 1e9:.3g} GB/s)")
    lines += ["", "A lower achieved MFU than the profile's 50% closes the gap too (more compute to hide the ring's "
              "rotation behind); the paper does not report its ring baseline's communication time.", ""]
    for scaling, label in (("weak", f"{args.tokens_per_device // 1024}K tokens per device"),
                           ("strong", f"{args.seq_len // 1024}K tokens in all")):
        rows = [r for r in results["projections"] if r["scaling"] == scaling and r["hardware"] == "a100"]
        lines += [f"## Tokens/s on the A100 profile, {scaling} scaling ({label}), linear attention", "",
                  report.markdown_table(["devices"] + list(comm.SCHEMES),
                                        [[world] + [_cell(rows, s, "linear", world) for s in comm.SCHEMES]
                                         for world in args.devices]), ""]
    for hw_name, rows in results["ranking"].items():
        lines += [f"## Ranking by projected step time, {HARDWARE[hw_name].name}", "",
                  "Fastest first; a scheme missing from a cell cannot run there (Ulysses: W must divide the KV heads).",
                  "", report.markdown_table(
                      ["tokens", "devices", "softmax attention", "linear attention"],
                      [[f"{seq // 1024}K", world] + [
                          " < ".join(f"{s} {fmt_time(t)}" for s, t in next(
                              r["order"] for r in rows if (r["seq_len"], r["world"], r["attention"]) ==
                              (seq, world, kind))) for kind in ("softmax", "linear")]
                       for seq in RANK_TOKENS for world in RANK_DEVICES]), ""]
    lines += ["Model (``attnjax.parallel.comm``): per layer and direction, comm = bytes / bandwidth + (W - 1) hops "
              "x latency; ring hides its rotation behind its compute, LASP-2 its all-gather behind the intra-chunk "
              "term, all-gather and Ulysses hide nothing; a collective over more than 8 devices runs at the inter-"
              "node rate. Ring and all-gather on linear attention fold every other rank's K/V chunk into a state "
              "(the right-product trick is used, but W - 1 times per device). Ulysses needs W to divide the 8 KV "
              "heads; its row is also the cost of Hè & Kabic's distributed multi-head attention (catalog SP5: the "
              "same sequence-to-heads re-sharding, see ``attnjax.parallel.ulysses``). The rest of the model (6 x "
              "60.8M parameter FLOPs per token and layer) is the same for all schemes. These are projections from "
              "closed-form bytes and FLOPs, not measurements.", ""]
    return "\n".join(lines)


def _cell(rows: list[dict], scheme: str, attention: str, world: int) -> str:
    for r in rows:
        if r["scheme"] == scheme and r["attention"] == attention and r["world"] == world:
            return f"{r['tokens_per_s']:.3g}" if r["feasible"] else "n/a"
    return ""


def plot(results: dict, args: argparse.Namespace, path: Path) -> Path:
    """Projected tokens/s under weak and strong scaling, and bytes per device per layer, vs devices."""
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    styles = {"ring": "o-", "allgather": "s-", "ulysses": "^-", "lasp2": "D-"}
    for ax, scaling in zip(axes[:2], ("weak", "strong")):
        for scheme in comm.SCHEMES:
            for attention in SCHEME_ATTENTION[scheme]:
                rows = [r for r in results["projections"] if r["scaling"] == scaling and r["hardware"] == "a100"
                        and r["scheme"] == scheme and r["attention"] == attention and r["feasible"]]
                if rows:
                    ax.plot([r["world"] for r in rows], [r["tokens_per_s"] for r in rows], styles[scheme],
                            alpha=1.0 if attention == "linear" else 0.4,
                            label=f"{scheme} ({attention})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices")
        ax.set_ylabel("tokens / s (projected)")
        what = f"{args.tokens_per_device // 1024}K tokens/device" if scaling == "weak" else \
            f"{args.seq_len // 1024}K tokens"
        ax.set_title(f"A100 profile, {scaling} scaling ({what})")
        plots.label_x(ax, args.devices)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    for scheme in comm.SCHEMES:
        rows = [r for r in results["projections"] if r["scaling"] == "weak" and r["hardware"] == "a100"
                and r["scheme"] == scheme and r["attention"] == "linear" and r["feasible"]]
        ax.plot([r["world"] for r in rows], [r["bytes"] / MODEL["layers"] for r in rows], styles[scheme], label=scheme)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("bytes sent per device per layer (fwd + bwd)")
    ax.set_title("communication volume, weak scaling")
    plots.label_x(ax, args.devices)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict:
    """The measured part (unless ``--no-measure``), the paper's setting, the projections and break-even bandwidths."""
    measured = measure(args.measure_seq_len) if args.measure else []
    paper = {}
    for hw_name, hw in HARDWARE.items():
        rows = [project(PAPER_TOKENS, PAPER_DEVICES, hw, s, a) for s, kinds in SCHEME_ATTENTION.items() for a in kinds]
        lasp2 = next(r for r in rows if r["scheme"] == "lasp2")["step"]
        paper[hw_name] = [dict(r, lasp2_speedup=r["step"] / lasp2) if r["feasible"] and r["attention"] == "linear"
                          else r for r in rows]
    return {"device": host.device_info(), "args": report.jsonable_args(args), "model": MODEL,
            "hardware": {k: dataclasses.asdict(v) for k, v in HARDWARE.items()}, "measured": measured,
            "paper": paper, "projections": projections(args),
            "break_even_bandwidth": {k: break_even_bandwidth(hw) for k, hw in HARDWARE.items()},
            "ranking": {k: ranking(hw) for k, hw in HARDWARE.items()}}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run; write JSON, markdown and PNG; print the report; return the results."""
    args = parse_args(argv)
    results = run(args)
    md = markdown_report(results, args)
    print(md)
    out = Path(args.out)
    report.write_json(results, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    plot(results, args, out / f"{args.name}.png")
    return results


if __name__ == "__main__":
    main()
