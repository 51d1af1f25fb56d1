"""What the library's internals need to run where JAX users run them: inside ``shard_map`` and on
explicitly sharded arrays.

* Inside ``jax.shard_map`` (default ``check_vma=True``) every value is typed by the manual mesh
  axes it varies over. A loop carry or a ``lax.switch``/``lax.cond`` branch that starts as a
  constant (zeros, ``-inf``) must be cast to vary like the per-device inputs it meets:
  ``vary_like(init, q, k, v)``.
  A Pallas call's ``out_shape`` says the same of its outputs: ``varying_structs``.
* On a mesh from ``jax.make_mesh`` (Explicit axes by default) a sharding is part of an array's
  type, and reshapes/gathers whose output sharding is ambiguous are refused. The blocked paths
  reshape and gather freely, so ``on_auto_axes`` runs them with the Explicit axes switched to Auto
  (``jax.sharding.auto_axes``) and gives the outputs the inputs' ``[B, T, H]`` sharding back;
  ``attnjax.dispatch`` calls every implementation through it.

Both are no-ops on plain arrays and on jax versions without these types.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax import lax


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` is typed as varying over (empty outside ``shard_map``).

    jax >= 0.10 spells this ``aval.manual_axis_type.varying``; 0.7-0.9 ``aval.vma``; older jax has none.
    """
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def vary_like(tree, *refs):
    """Each array leaf of ``tree`` typed as varying over every manual axis some leaf of ``refs`` varies over.

    Use it on the constant initial value of a loop carry or a constant ``lax.switch``/``lax.cond``
    branch output inside a path that may run under ``shard_map(check_vma=True)``; autodiff then sums
    the cotangent over those axes. A no-op outside ``shard_map`` and under ``check_vma=False``.
    """
    wanted = frozenset().union(*(varying_axes(r) for r in jax.tree_util.tree_leaves(refs)))
    if not wanted:
        return tree

    def cast(x):
        missing = tuple(sorted(wanted - varying_axes(x), key=str))
        if not missing:
            return x
        return lax.pcast(x, missing, to="varying") if hasattr(lax, "pcast") else lax.pvary(x, missing)

    return jax.tree_util.tree_map(cast, tree)


def varying_structs(structs, *refs):
    """Each ``jax.ShapeDtypeStruct`` leaf of ``structs`` typed as varying like ``refs``.

    A Pallas call's ``out_shape`` inside ``shard_map(check_vma=True)`` must say which manual axes
    its outputs vary over; a kernel's outputs vary like its operands.
    """
    wanted = frozenset().union(*(varying_axes(r) for r in jax.tree_util.tree_leaves(refs)))
    if not wanted:
        return structs
    manual_type = getattr(jax.sharding, "ManualAxisType", None)

    def typed(s):
        if manual_type is not None:
            return jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=manual_type(varying=wanted))
        return jax.ShapeDtypeStruct(s.shape, s.dtype, vma=wanted)

    return jax.tree_util.tree_map(typed, structs)


def explicit_axes(*arrays) -> tuple:
    """Mesh axes of type Explicit in the shardings of ``arrays`` (``()`` for plain arrays)."""
    axes = []
    for x in jax.tree_util.tree_leaves(arrays):
        if not isinstance(x, jax.Array) or not hasattr(jax, "typeof"):
            continue
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        for name, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())):
            if "Explicit" in str(kind) and name not in axes:
                axes.append(name)
    return tuple(axes)


def on_auto_axes(fn: Callable, q: jax.Array, *args, **kwargs):
    """``fn(q, *args, **kwargs)``, with any Explicit mesh axes of the array arguments switched to Auto.

    An array output whose leading dims have ``q``'s sizes (an attention output ``[B, T, H, Dv]``,
    a log-sum-exp ``[B, T, H]``, a recurrent state ``[B, ...]``) gets ``q``'s sharding on those dims
    and none on the others. Without Explicit axes this is ``fn(q, *args, **kwargs)``; with them
    ``fn`` is traced once more to learn its output shapes.
    """
    axes = explicit_axes(q, args, kwargs)
    if not axes:
        return fn(q, *args, **kwargs)
    leaves, tree = jax.tree_util.tree_flatten((q, args, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]

    def call(*arrays):
        it = iter(arrays)
        q, args, kwargs = jax.tree_util.tree_unflatten(tree, [next(it) if a else x for x, a in zip(leaves, is_array)])
        return fn(q, *args, **kwargs)

    sharding = jax.typeof(q).sharding
    spec = tuple(sharding.spec) + (None,) * (q.ndim - len(sharding.spec))

    def named(*dims):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*dims))

    def like_q(out: jax.ShapeDtypeStruct):
        lead = []
        for d, size in enumerate(out.shape[:q.ndim]):
            if size != q.shape[d]:
                break
            lead.append(spec[d])
        return named(*lead)

    shapes = jax.eval_shape(jax.sharding.auto_axes(call, axes=axes, out_sharding=named()), *arrays)
    out_sharding = jax.tree_util.tree_map(like_q, shapes)
    return jax.sharding.auto_axes(call, axes=axes, out_sharding=out_sharding)(*arrays)


def accepts_explicit_meshes(fn: Callable) -> Callable:
    """Decorator for a public entry point ``fn(q, ...)``: run it through ``on_auto_axes``.

    ``attnjax.attention``, ``linear_attention`` and ``block_sparse_attention`` carry it; the
    per-implementation functions behind them expect arrays without Explicit axes (plain, Auto, or
    per-device inside ``shard_map``).
    """
    @functools.wraps(fn)
    def wrapped(q, *args, **kwargs):
        return on_auto_axes(fn, q, *args, **kwargs)
    return wrapped


__all__ = ["varying_axes", "vary_like", "varying_structs", "explicit_axes", "on_auto_axes", "accepts_explicit_meshes"]
