"""Attention FLOPs by FlashAttention-2's convention, and a plain matmul of the same work (the reference rate)."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from experiments.lib.workload import MODES

FWD_BWD_FLOP_FACTOR = 3.5
"""Forward+backward FLOPs over forward FLOPs, FlashAttention-2's benchmark convention: the backward
is 2.5x the forward (5 matmuls against 2: the recomputed ``QK^T``, ``dV``, ``dP``, ``dQ``, ``dK``)."""


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool,
                    mode: str = "fwd", head_dim_v: Optional[int] = None) -> float:
    """Useful FLOPs of dense softmax attention (Dao 2023, FlashAttention-2, section 4.1).

    Forward: ``2·B·H·T·S·D`` for ``QK^T`` plus ``2·B·H·T·S·Dv`` for ``PV``, i.e. ``4·B·H·T·S·D`` when
    ``Dv = D``; halved for a causal mask (the work above the diagonal is not useful). ``"fwd_bwd"``
    multiplies by ``FWD_BWD_FLOP_FACTOR``. For a subquadratic mechanism this is its *dense-equivalent*
    work, so its achieved rate can exceed the hardware's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    flops = 2.0 * batch * heads * q_len * kv_len * (head_dim + head_dim_v)
    flops = flops / 2 if causal else flops
    return flops * FWD_BWD_FLOP_FACTOR if mode == "fwd_bwd" else flops


def matmul_for_flops(flops: float, dtype=jnp.float32) -> tuple[Callable, tuple, float]:
    """A square ``jnp.matmul`` with about ``flops`` FLOPs: ``(fn, (a, b), exact FLOPs = 2·n³)``.

    The reference rate: a plain matmul of the same work on the same device.
    """
    n = max(1, round((flops / 2) ** (1 / 3)))
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32).astype(jnp.dtype(dtype))) for _ in range(2))
    return jnp.matmul, (a, b), 2.0 * n ** 3
