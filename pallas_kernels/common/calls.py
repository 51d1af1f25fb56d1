"""``pallas_call`` for every kernel: ``pl.pallas_call`` whose outputs vary like its operands.

Inside the user's ``jax.shard_map`` (default ``check_vma=True``) a Pallas call's ``out_shape`` must
name the manual mesh axes its outputs vary over (``attnjax.meshes.varying_structs``); every kernel's
outputs are per-device values of its per-device operands. Operands are cast to vary alike (a
schedule computed from static shapes meets per-device q/k/v).
"""

from __future__ import annotations

from typing import Callable

from jax.experimental import pallas as pl

from attnjax.meshes import vary_like, varying_axes, varying_structs


def pallas_call(kernel: Callable, *, out_shape, **kwargs) -> Callable:
    """``pl.pallas_call(kernel, out_shape=..., **kwargs)``, its ``out_shape`` typed like the operands.

    Raises NotImplementedError in interpret mode inside ``shard_map(check_vma=True)``: jax's
    interpreter indexes per-device refs with grid indices typed as replicated, which the type
    check refuses (compiled Triton and Mosaic calls are fine). Use the "xla" implementation there,
    or ``check_vma=False``.
    """
    def call(*operands):
        axes = frozenset().union(*(varying_axes(x) for x in operands))
        if axes and kwargs.get("interpret"):
            raise NotImplementedError(
                f"Pallas interpret mode can't run inside jax.shard_map with check_vma=True (operands vary over "
                f"{sorted(axes)}); use implementation='xla' or 'auto', or shard_map(check_vma=False)")
        operands = vary_like(operands, operands)
        return pl.pallas_call(kernel, out_shape=varying_structs(out_shape, operands), **kwargs)(*operands)
    return call


__all__ = ["pallas_call"]
