"""``shard_map`` wrappers for sequence-parallel attention: a mesh (``jax.make_mesh`` with Explicit or
Auto axes, or ``jax.sharding.Mesh``) plus the mesh axes that shard the batch, the sequence and the
heads, with clear errors for unknown axes and bad divisibility.

Every scheme in ``attnjax.parallel`` is a function called inside ``shard_map`` on per-device
shards ``q [B/nb, T/W, Hq/nh, D]`` (``W`` = size of the sequence axis). ``sequence_parallel_call``
builds that ``shard_map`` for global arrays, so ``*_sharded`` wrappers are one line each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.checks import check_qkv
from attnjax.parallel.layouts import check_layout, check_positions, check_structural

AxisNames = Union[None, str, Sequence[str]]


def shard_map(f: Callable, *, mesh, in_specs, out_specs, check_vma: bool = True) -> Callable:
    """``jax.shard_map`` where it exists (jax >= 0.6), else ``jax.experimental.shard_map``
    (whose ``check_rep`` plays the role of ``check_vma``)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map as experimental_shard_map  # optional dependency: jax < 0.7
    return experimental_shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def axis_size(axis_name: str) -> int:
    """Size of the mesh axis ``axis_name`` of the enclosing ``shard_map``; ``ValueError`` if unbound."""
    try:
        return lax.axis_size(axis_name)
    except NameError:
        bound = tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the enclosing shard_map "
                         f"(its mesh axes: {bound}); call this inside jax.shard_map over a mesh with that axis, "
                         "or use the *_sharded wrapper") from None


def check_local_inputs(q, k, v, *, axis_name: str, layout: str, mask, segment_ids, kv_heads: bool = False):
    """Checks shared by the per-device schemes; returns ``(world, mask)`` (``None`` -> ``Full()``).

    q/k/v are this device's self-attention shards (equal lengths), ``segment_ids`` int ``[B, T]``;
    ``kv_heads``: the scheme takes K and V with different head counts (``checks.check_qkv``).
    """
    check_qkv(q, k, v, kv_heads=kv_heads)
    B, T = q.shape[:2]
    if k.shape[1] != T:
        raise ValueError(f"sequence-parallel attention is self-attention: q has {T} tokens per device "
                         f"but k has {k.shape[1]}")
    world = axis_size(axis_name)
    check_layout(layout, world, T, local=True)
    mask = check_structural(mask)
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected [B, T] = ({B}, {T}) "
                             "(this device's tokens)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
    return world, mask


def is_manual_axis(axis_name: str) -> bool:
    """Whether ``axis_name`` is a manual axis here, i.e. we are inside a ``shard_map`` over it."""
    return axis_name in tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def ambient_mesh():
    """The mesh set by ``jax.set_mesh`` (an ``AbstractMesh`` under jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _names(axes: AxisNames) -> tuple:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class SequenceSharding:
    """How ``[B, T, H, D]`` arrays are sharded: batch over ``batch_axis``, sequence over
    ``seq_axis`` (one mesh axis), heads over ``head_axis`` (axes may be None or tuples of names).

    Raises ValueError if an axis is not in ``mesh.axis_names`` or is used twice.
    """

    mesh: object
    seq_axis: str
    batch_axis: AxisNames = None
    head_axis: AxisNames = None

    def __post_init__(self):
        if not isinstance(self.seq_axis, str):
            raise TypeError(f"seq_axis must be one mesh axis name (a str), got {self.seq_axis!r}")
        names = tuple(self.mesh.axis_names)
        used = []
        for arg, axes in (("seq_axis", self.seq_axis), ("batch_axis", self.batch_axis),
                          ("head_axis", self.head_axis)):
            for axis in _names(axes):
                if axis not in names:
                    raise ValueError(f"{arg}={axis!r} is not an axis of the mesh; its axes are {names}")
                if axis in used:
                    raise ValueError(f"mesh axis {axis!r} is used twice among seq_axis, batch_axis, head_axis")
                used.append(axis)

    def size(self, axes: AxisNames) -> int:
        """Number of devices along ``axes`` (1 for None)."""
        return math.prod(self.mesh.shape[a] for a in _names(axes))

    @property
    def world(self) -> int:
        """Number of devices along the sequence axis."""
        return self.size(self.seq_axis)

    def _axis(self, axes: AxisNames):
        names = _names(axes)
        return None if not names else names[0] if len(names) == 1 else names

    @property
    def tokens_spec(self) -> P:
        """Spec of ``[B, T, H, D]`` arrays."""
        return P(self._axis(self.batch_axis), self.seq_axis, self._axis(self.head_axis), None)

    @property
    def state_spec(self) -> P:
        """Spec of per-sequence states ``[B, H, ...]`` (replicated along the sequence axis)."""
        return P(self._axis(self.batch_axis), self._axis(self.head_axis))

    @property
    def ids_spec(self) -> P:
        """Spec of ``[B, T]`` arrays (segment ids)."""
        return P(self._axis(self.batch_axis), self.seq_axis)

    def check(self, q, k, v, segment_ids=None, *, layout: str = "contiguous", heads_multiple: int = 1,
              kv_heads: bool = False) -> None:
        """ValueError unless the shapes split evenly over the mesh.

        ``heads_multiple``: each device's share of the heads must also divide by it (Ulysses).
        ``kv_heads``: K and V may have different head counts (``checks.check_qkv``).
        """
        check_qkv(q, k, v, kv_heads=kv_heads)
        B, T, Hq, _ = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        if S != T:
            raise ValueError(f"sequence-parallel attention is self-attention: q length {T} != k length {S}")
        check_layout(layout, self.world, T)
        nb, nh = self.size(self.batch_axis), self.size(self.head_axis)
        if B % nb:
            raise ValueError(f"batch {B} is not divisible by the {nb} devices of batch_axis={self.batch_axis!r}")
        for name, heads in (("q heads", Hq), ("kv heads", Hkv), ("v heads", v.shape[2])):
            if heads % (nh * heads_multiple):
                why = f"{nh} device(s) on head_axis={self.head_axis!r}"
                if heads_multiple > 1:
                    why += f" x {heads_multiple} on seq_axis={self.seq_axis!r}, over which the scheme splits heads"
                raise ValueError(f"{name} ({heads}) must be divisible by {nh * heads_multiple} ({why})")
        if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected [B, T] = ({B}, {T})")

    def run(self, fn: Callable, args: tuple, in_specs: tuple, out_specs=None):
        """``fn(*args)`` on each device's shards, under ``shard_map`` over the mesh; the output is
        sharded as ``out_specs`` (default ``tokens_spec``).

        On a mesh with Explicit axes (``jax.make_mesh``'s default) ``jax.shard_map`` takes only inputs
        already sharded as its ``in_specs``, so each argument is resharded to its spec first
        (``jax.reshard``; under ``jit`` the inputs must live on the mesh, or run under ``jax.set_mesh``).
        """
        if any(kind == jax.sharding.AxisType.Explicit for kind in getattr(self.mesh, "axis_types", ())):
            args = tuple(jax.reshard(x, NamedSharding(self.mesh, spec)) for x, spec in zip(args, in_specs))
        out_specs = self.tokens_spec if out_specs is None else out_specs
        return shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def sequence_parallel_call(fn: Callable, q, k, v, *, mesh, seq_axis: str, batch_axis: AxisNames = None,
                           head_axis: AxisNames = None, layout: str = "contiguous", segment_ids=None,
                           positions=None, heads_multiple: int = 1, kv_heads: bool = False, **kwargs):
    """Run a sequence-parallel scheme ``fn(q, k, v, *, axis_name, layout, segment_ids, **kwargs)``
    on global arrays already in ``layout`` order: checks, then ``shard_map`` over ``mesh``.

    ``positions`` (optional, ``[T]`` or ``[B, T]``): the global positions of the tokens as laid
    out; when concrete they must match ``layout`` (a clear error names the layout they follow).
    ``kv_heads``: ``fn`` takes K and V with different head counts.
    """
    if kwargs.get("return_lse"):
        raise ValueError("return_lse is available from the per-device function inside shard_map, not the wrapper")
    sharding = SequenceSharding(mesh, seq_axis, batch_axis, head_axis)
    sharding.check(q, k, v, segment_ids, layout=layout, heads_multiple=heads_multiple, kv_heads=kv_heads)
    if positions is not None:
        check_positions(positions, layout, sharding.world)

    def local(q, k, v, ids=None):
        return fn(q, k, v, axis_name=seq_axis, layout=layout, segment_ids=ids, **kwargs)

    tokens = sharding.tokens_spec
    if segment_ids is None:
        return sharding.run(local, (q, k, v), (tokens,) * 3)
    return sharding.run(local, (q, k, v, segment_ids), (tokens,) * 3 + (sharding.ids_spec,))


__all__ = ["shard_map", "axis_size", "check_local_inputs", "is_manual_axis", "ambient_mesh",
           "SequenceSharding", "sequence_parallel_call"]
