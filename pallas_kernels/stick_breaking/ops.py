"""Thin dispatch for the Pallas stick-breaking kernels: the GPU (Triton) or TPU (Mosaic) kernel by
backend; on CPU the GPU kernel runs in interpret mode (correct, slow).

Reference: ``attnjax.softmax.stick_breaking.stick_breaking_attention_reference``
(tests/softmax/test_stick_breaking.py).
"""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels.common.interpret import default_interpret
from pallas_kernels.stick_breaking.tiles import with_remainder
from pallas_kernels.stick_breaking import common, gpu, tpu


def stick_breaking_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks=None, dropout_rate: float = 0.0, rng=None,
    return_lse: bool = False, return_remainder: bool = False, block_q: Optional[int] = None,
    block_kv: Optional[int] = None, backend: Optional[str] = None, interpret: Optional[bool] = None,
):
    """Stick-breaking attention (Tan et al. 2024) as a Pallas kernel with a custom VJP.

    ``out_i = Σ_{j<i} A_ij v_j + r_i v_i`` with ``A_ij = σ(z_ij) ∏_{j<k<i} (1 − σ(z_ik))`` and
    the un-allocated stick ``r_i = 1 − Σ_j A_ij`` given to the current token (conventions and
    math: ``attnjax.softmax.stick_breaking``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``, T ≤ S).
      mask: a mask implying causality (``masks.Causal()``, optionally ``&`` Segments, ...).
      scale, logits_soft_cap: as in the reference. bias, sinks, dropout_rate, rng, return_lse:
        accepted for the ``attnjax.attention`` signature; anything but the defaults raises
        NotImplementedError (a bias: use implementation="xla").
      return_remainder: also return ``r [B, T, Hq]`` float32.
      block_q, block_kv: tile sizes; None = the backend's default, clipped for short sequences.
      backend: "gpu", "tpu" or "cpu"; None = ``jax.default_backend()`` ("cpu" runs the GPU kernel
        in interpret mode).
      interpret: force interpret mode (default: only on CPU; TPU uses ``pltpu.InterpretParams``).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, and ``r`` if asked.
    """
    common.validate(q, k, v, mask=mask, bias=bias, sinks=sinks, dropout_rate=dropout_rate, return_lse=return_lse)
    backend = backend or jax.default_backend()
    blocks = {n: b for n, b in (("block_q", block_q), ("block_kv", block_kv)) if b is not None}
    if backend == "tpu":
        o, c = tpu.stick_breaking_core_tpu(q, k, v, mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                           interpret=bool(interpret), **blocks)
    elif backend in ("gpu", "cuda", "rocm", "cpu"):
        o, c = gpu.stick_breaking_core_gpu(q, k, v, mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                           interpret=default_interpret(interpret, backend, "stick_breaking"),
                                           **blocks)
    else:
        raise NotImplementedError(f"no Pallas stick-breaking kernel for backend {backend!r}")
    out, r = with_remainder(o, c, v, mask, q.dtype)
    return (out, r) if return_remainder else out


__all__ = ["stick_breaking_attention_pallas"]
