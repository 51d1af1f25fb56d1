"""Communication report from compiled HLO, and a step-time cost model for sequence parallelism.

``collectives(compiled)`` lists every collective in the compiled (post-SPMD) HLO module of a
``jax.jit(...).lower(...).compile()``, with the bytes each device *sends* per execution and how
many times it runs (loop trip counts from XLA's ``known_trip_count``). ``collective_bytes`` sums
them per kind. "Sent" is what a bandwidth-optimal algorithm puts on each device's link, for a
group of ``g`` devices and a per-device operand of ``n`` bytes:

=====================  ===========================  ============================================
collective             bytes sent per device        why
=====================  ===========================  ============================================
all-gather             ``(g − 1)·n``                every shard must reach the ``g − 1`` others
reduce-scatter         ``(g − 1)·n / g``            ring: ``g − 1`` steps of one ``n/g`` block
all-reduce             ``2·(g − 1)·n / g``          reduce-scatter then all-gather
all-to-all             ``(g − 1)·n / g``            keeps its own ``1/g``, sends the rest
collective-permute     ``n``                        one send (0 if the device only sends to itself)
=====================  ===========================  ============================================

The cost model (``SCHEMES``, ``traffic``, ``step_time``) projects one training step of an attention
layer stack under the four sequence-parallel schemes of ``attnjax.parallel`` from closed-form bytes
and FLOPs per device; the byte formulas are the ones ``collective_bytes`` measures on the compiled
layers (``tests/parallel/test_comm.py`` checks them against each other).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
"""Collective kinds reported, as HLO spells them."""

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
    "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8, "f8e3m4": 8,
    "f8e8m0fnu": 8, "f4e2m1fn": 4,
}
_OPCODE = re.compile(r"\s(" + "|".join(KINDS) + r")(-done)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[0-9,{} ]*\})\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_PAIRS = re.compile(r"source_target_pairs=\{([0-9,{} ]*)\}")
_DEVICES = re.compile(r"\bnum_partitions=(\d+)")
_REPLICAS = re.compile(r"\breplica_count=(\d+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled HLO module.

    Attributes:
      kind: one of ``KINDS``.
      name: the HLO instruction name.
      group_size: devices per replica group ``g``.
      operand_bytes: bytes of the per-device input ``n``.
      sent_bytes: bytes each device sends per execution (module docstring's table).
      executions: how many times it runs per call of the module (product of enclosing loop trip
        counts; a collective in a conditional's branch counts once per execution of the conditional).
    """

    kind: str
    name: str
    group_size: int
    operand_bytes: int
    sent_bytes: int
    executions: int

    @property
    def total_sent_bytes(self) -> int:
        """``sent_bytes × executions``."""
        return self.sent_bytes * self.executions


def hlo_text(compiled_or_lowered) -> str:
    """The compiled HLO text of a ``jax.stages.Compiled`` or ``Lowered`` (compiled here), or a string."""
    if isinstance(compiled_or_lowered, str):
        return compiled_or_lowered
    if isinstance(compiled_or_lowered, jax.stages.Lowered):
        compiled_or_lowered = compiled_or_lowered.compile()
    if not isinstance(compiled_or_lowered, jax.stages.Compiled):
        raise TypeError("expected a jax Compiled or Lowered object or HLO text, got "
                        f"{type(compiled_or_lowered).__name__}")
    return compiled_or_lowered.as_text()


def collectives(compiled_or_lowered) -> list[Collective]:
    """Every collective of the module, with per-device bytes sent and execution counts.

    Args:
      compiled_or_lowered: ``jax.jit(f).lower(...).compile()``, its ``Lowered`` (compiled here), or
        compiled HLO text. Async pairs (``*-start``/``*-done``) count once, at the ``-done``.
    Returns:
      A list of ``Collective`` in program text order.
    Raises:
      ValueError if a while loop holding a collective has no known trip count.
    """
    text = hlo_text(compiled_or_lowered)
    devices = _int(_DEVICES, text, 1) * _int(_REPLICAS, text, 1)
    bodies, headers = _computations(text)
    executions = _executions(bodies, headers)
    found = []
    for comp, lines in bodies.items():
        for line in lines:
            match = _OPCODE.search(line)
            if match is None:
                continue
            kind = match.group(1)
            lhs = line[:line.index("=")]
            result_bytes = _bytes(line[len(lhs) + 1:match.start()])
            group = _group_size(line, devices)
            operand, sent = _traffic(kind, result_bytes, group, line)
            runs = executions.get(comp)
            if runs is None:
                raise ValueError(f"collective {lhs.strip()} sits in a loop without a known trip count; can't count "
                                 "how often it runs")
            found.append(Collective(kind, lhs.strip().removeprefix("ROOT").strip().lstrip("%"), group, operand, sent,
                                    runs))
    return found


def collective_bytes(compiled_or_lowered) -> dict[str, int]:
    """Bytes each device sends per call, per collective kind (every kind in ``KINDS``, 0 if absent).

    See the module docstring for what "sent" means for each kind; loops count their trip counts.
    """
    totals = {kind: 0 for kind in KINDS}
    for c in collectives(compiled_or_lowered):
        totals[c.kind] += c.total_sent_bytes
    return totals


def collective_counts(compiled_or_lowered) -> dict[str, int]:
    """How many collectives of each kind the module runs per call (loop trip counts included)."""
    counts = {kind: 0 for kind in KINDS}
    for c in collectives(compiled_or_lowered):
        counts[c.kind] += c.executions
    return counts


def _int(pattern: re.Pattern, text: str, default: int) -> int:
    match = pattern.search(text)
    return int(match.group(1)) if match else default


def _computations(text: str):
    """``{name: [instruction lines]}`` and ``{name: header line}`` of an HLO module's text."""
    bodies, headers, current = {}, {}, None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            match = _COMPUTATION.match(line)
            if match and line.rstrip().endswith("{"):
                current = match.group(1)
                bodies[current], headers[current] = [], line
                if line.startswith("ENTRY"):
                    headers["__entry__"] = current
            elif line.startswith("}"):
                current = None
            continue
        if current is not None:
            bodies[current].append(line)
    return bodies, headers


def _executions(bodies: dict, headers: dict) -> dict:
    """Executions per module call of each computation reachable from ENTRY (None: unknown loop)."""
    entry = headers.get("__entry__")
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    edges = {}
    for comp, lines in bodies.items():
        out = []
        for line in lines:
            if " async-done(" in line:      # the computation runs once, at its async-start
                continue
            trip = _TRIP_COUNT.search(line)
            for role, callee in _CALLEES.findall(line):
                if role in ("body", "condition"):
                    out.append((callee, int(trip.group(1)) + (role == "condition") if trip else None))
                else:
                    out.append((callee, 1))
            for group in _BRANCHES.findall(line):
                out.extend((name.strip().lstrip("%"), 1) for name in group.split(","))
        edges[comp] = out
    counts = {entry: 1}
    order = [entry]
    for comp in order:                     # call graphs of HLO modules are DAGs
        for callee, factor in edges.get(comp, ()):
            runs = None if factor is None or counts[comp] is None else counts[comp] * factor
            if callee not in counts:
                order.append(callee)
                counts[callee] = runs
            elif counts[callee] is not None:
                counts[callee] = None if runs is None else counts[callee] + runs
    return counts


def _bytes(type_text: str) -> int:
    """Total bytes of the array types in an HLO type (an array or a tuple of arrays)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BITS:
            continue
        size = math.prod(int(d) for d in dims.split(",") if d)
        total += size * _DTYPE_BITS[dtype] // 8
    return total


def _group_size(line: str, devices: int) -> int:
    iota = _GROUPS_IOTA.search(line)
    if iota:
        return int(iota.group(2))
    listed = _GROUPS_LIST.search(line)
    if listed:
        first = re.search(r"\{([0-9, ]*)\}", listed.group(1))
        ids = [x for x in first.group(1).split(",") if x.strip()] if first else []
        if ids:
            return len(ids)
    return devices


def _traffic(kind: str, result_bytes: int, group: int, line: str):
    """``(operand bytes, bytes sent per device)`` of one collective from its result size."""
    if kind == "all-gather":
        operand = result_bytes // group
        return operand, (group - 1) * operand
    if kind == "reduce-scatter":
        operand = result_bytes * group
        return operand, (group - 1) * result_bytes
    if kind == "all-reduce":
        return result_bytes, 2 * (group - 1) * result_bytes // group
    if kind == "all-to-all":
        return result_bytes, (group - 1) * result_bytes // group
    pairs = _PAIRS.search(line)
    moves = re.findall(r"\{(\d+),(\d+)\}", pairs.group(1)) if pairs else []
    sends = any(a != b for a, b in moves)
    return result_bytes, result_bytes if sends else 0


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------

SCHEMES = ("ring", "allgather", "ulysses", "lasp2")
"""Sequence-parallel schemes of the cost model (``attnjax.parallel``'s ring, all-gather, Ulysses
and LASP-2)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """One attention layer's global shapes (per training step).

    Attributes:
      batch, seq_len: ``B`` and the global sequence length ``T``.
      heads, kv_heads, head_dim: ``Hq``, ``Hkv``, ``D`` (``Dv = D``).
      dtype_bytes: bytes of an activation element (2 for bf16).
      chunk_size: Lightning chunk ``c`` of linear attention's intra-chunk term.
      decay: linear attention with a per-head decay (LASP-2 then sends one state per query head,
        else one per kv head).
    """

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    chunk_size: int = 64
    decay: bool = False


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device throughput and links.

    Attributes:
      name: label.
      flops: sustained FLOP/s of one device (peak × achievable utilization).
      intra_node_bandwidth, inter_node_bandwidth: bytes/s one device can send inside a node / to
        another node. A collective over more than ``devices_per_node`` devices runs at the
        inter-node rate (its slowest hop).
      devices_per_node: devices sharing the fast intra-node links.
      latency: seconds per message hop (a ``W``-device collective pays ``W − 1`` of them).
    """

    name: str
    flops: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int = 8
    latency: float = 1e-5

    def bandwidth(self, world: int) -> float:
        """Bytes/s per device for a collective over ``world`` devices."""
        return self.intra_node_bandwidth if world <= self.devices_per_node else self.inter_node_bandwidth


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Per device and layer, forward and backward: bytes sent, sequential message hops, FLOPs,
    and the FLOPs that can run while the collective is in flight."""

    bytes_fwd: float
    bytes_bwd: float
    hops_fwd: int
    hops_bwd: int
    flops_fwd: float
    flops_bwd: float
    hidden_flops_fwd: float
    hidden_flops_bwd: float


def feasible(scheme: str, w: Workload, world: int, attention: str) -> Optional[str]:
    """None if ``scheme`` can run ``w`` on ``world`` devices, else the reason it can't."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if attention not in ("softmax", "linear"):
        raise ValueError(f"attention must be 'softmax' or 'linear', got {attention!r}")
    if w.seq_len % world:
        return f"T={w.seq_len} not divisible by W={world}"
    if scheme == "lasp2" and attention != "linear":
        return "LASP-2 needs linear attention"
    if scheme == "ulysses" and (w.heads % world or w.kv_heads % world):
        return f"Ulysses needs W to divide the heads (Hq={w.heads}, Hkv={w.kv_heads})"
    return None


def traffic(scheme: str, w: Workload, world: int, attention: str = "softmax") -> Traffic:
    """Bytes each device sends and FLOPs it does for one layer (forward and backward).

    With ``C = T/W`` tokens per device, ``kv = B·C·Hkv·2D·b`` (K and V), ``qo = B·C·Hq·2D·b``:

    - ring: K/V rotate ``W − 1`` times forward; backward rotates K/V ``W − 1`` times and the float32
      dK/dV ``W`` times (``attnjax.parallel.ring``). Compute overlaps the rotation step by step.
    - allgather: one all-gather of K/V forward (``(W − 1)·kv``), one reduce-scatter of dK/dV back.
    - ulysses: all-to-alls of q, k, v and o forward, and of dO, dq, dk, dv back, each sending
      ``(W − 1)/W`` of its tensor.
    - lasp2: one all-gather of the float32 ``[B, H', D, D]`` states each way (``H' = Hq`` with
      decay, else ``Hkv``); the intra-chunk compute overlaps it.

    FLOPs (worst device): softmax causal attention with balanced (zigzag) layouts,
    ``4·B·Hq·D·C·T/2`` forward; linear attention (Lightning, chunk ``c``) ``B·C·Hq·(c·2D + 4D²)``
    forward for LASP-2 and Ulysses (each device runs the right-product recurrence on its share);
    ring and all-gather on linear attention fold each other rank's K/V chunk into a state
    (``4·B·C·Hq·D²`` per chunk, ``W − 1`` chunks on the last rank). Backward = 2.5× forward for
    softmax (FlashAttention-2), 2× for linear.
    """
    reason = feasible(scheme, w, world, attention)
    if reason:
        raise ValueError(f"{scheme} can't run this workload on {world} devices: {reason}")
    B, T, Hq, Hkv, D, b = w.batch, w.seq_len, w.heads, w.kv_heads, w.head_dim, w.dtype_bytes
    C = T // world
    kv = B * C * Hkv * 2 * D * b
    if attention == "softmax":
        local = 4 * B * Hq * D * C * T / 2
        hidden, ratio = 0.0, 2.5
    else:
        intra = B * C * Hq * min(w.chunk_size, C) * 2 * D
        local = intra + B * C * Hq * 4 * D * D
        if scheme in ("ring", "allgather"):
            local += (world - 1) * 4 * B * C * Hq * D * D
        hidden, ratio = intra, 2.0
    hops = world - 1
    if scheme == "ring":
        sent_fwd, sent_bwd = hops * kv, hops * kv + world * kv * 4 // b
        return Traffic(sent_fwd, sent_bwd, hops, world, local, ratio * local, local, ratio * local)
    if scheme == "allgather":
        return Traffic(hops * kv, hops * kv, hops, hops, local, ratio * local, 0.0, 0.0)
    if scheme == "ulysses":
        moved = (world - 1) / world * (kv + B * C * Hq * 2 * D * b)
        return Traffic(moved, moved, 4 * hops, 4 * hops, local, ratio * local, 0.0, 0.0)
    state = B * (Hq if w.decay else Hkv) * D * D * 4
    return Traffic(hops * state, hops * state, hops, hops, local, ratio * local, hidden, ratio * hidden)


def step_time(scheme: str, w: Workload, world: int, hw: Hardware, *, attention: str = "softmax",
              layers: int = 1, other_flops_per_token: float = 0.0) -> dict:
    """Projected step time (seconds) of ``layers`` attention layers under ``scheme``.

    Per direction: ``comm = bytes / bandwidth + hops · latency``, ``compute = flops / hw.flops``,
    and ``time = max(comm, hidden compute) + the rest of the compute`` (ring hides its rotation
    behind all of its compute, LASP-2 its all-gather behind the intra-chunk term, all-gather and
    Ulysses hide nothing). ``other_flops_per_token`` (e.g. ``6 × parameters per layer`` for the
    projections and MLP, forward + backward) adds the same compute to every scheme.

    Returns:
      dict with ``step`` (seconds), ``comm`` and ``compute`` (seconds, summed over directions and
      layers), ``bytes`` (per device per step) and ``tokens_per_s`` (global tokens per second).
    """
    t = traffic(scheme, w, world, attention)
    bandwidth = hw.bandwidth(world)
    total = comm = compute = 0.0
    for sent, hops, flops, hidden in ((t.bytes_fwd, t.hops_fwd, t.flops_fwd, t.hidden_flops_fwd),
                                      (t.bytes_bwd, t.hops_bwd, t.flops_bwd, t.hidden_flops_bwd)):
        c = sent / bandwidth + hops * hw.latency
        hide = hidden / hw.flops
        total += max(c, hide) + (flops - hidden) / hw.flops
        comm += c
        compute += flops / hw.flops
    other = other_flops_per_token * w.batch * w.seq_len / world / hw.flops
    step = layers * (total + other)
    return {"step": step, "comm": layers * comm, "compute": layers * (compute + other),
            "bytes": layers * (t.bytes_fwd + t.bytes_bwd), "tokens_per_s": w.batch * w.seq_len / step}
