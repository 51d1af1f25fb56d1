"""Thin dispatch for the Pallas flash-attention kernels: picks the GPU (Triton) or TPU (Mosaic)
kernel by backend; on CPU it runs the GPU kernel in interpret mode (correct, slow).

Reference: ``attnjax.softmax.softmax_attention_reference`` (tests/kernels/test_flash_gpu.py).
"""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels.common.interpret import default_interpret
from pallas_kernels.flash import common, gpu, tpu


def flash_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0,
    rng: Optional[jax.Array] = None, return_lse: bool = False, block_q: Optional[int] = None,
    block_kv: Optional[int] = None, backend: Optional[str] = None, interpret: Optional[bool] = None,
    weight_fn: common.WeightFunction = common.SOFTMAX,
):
    """FlashAttention-2 (Dao 2023) as a Pallas kernel with a custom VJP.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hk, D]``; v: ``[B, S, Hv, Dv]`` (``Hq % Hk == 0``,
        ``Hq % Hv == 0``; query head ``h`` reads K head ``h // (Hq // Hk)`` and V head ``h // (Hq // Hv)``
        by index map, as in DiffQKV, Lin et al. 2025, "Sigma").
      mask, bias, scale, logits_soft_cap, sinks, dropout_rate, rng, return_lse: as in
        ``attnjax.softmax.softmax_attention_reference`` (dropout_rate > 0 raises
        NotImplementedError).
      block_q, block_kv: tile sizes; None = the backend's default (GPU: 128 x 64), clipped for
        short sequences.
      backend: "gpu", "tpu" or "cpu"; None = ``jax.default_backend()``. "cpu" runs the GPU
        kernel with ``interpret=True``.
      interpret: force Pallas interpret mode (default: only on CPU).
      weight_fn: the score-to-weight function (``common.SOFTMAX``; see ``common.WeightFunction``).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, lse [B, T, Hq] float32)``.
    Raises:
      NotImplementedError for requests the kernel doesn't serve (dropout, unsupported mask kinds
      or bias types, head dims > 256), so ``attnjax.attention(implementation="auto")`` falls back.
    """
    backend = backend or jax.default_backend()
    kwargs = dict(mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                  dropout_rate=dropout_rate, rng=rng, return_lse=return_lse)
    if backend == "tpu":
        blocks = {n: b for n, b in (("block_q", block_q), ("block_kv", block_kv)) if b is not None}
        return tpu.flash_attention_tpu(q, k, v, **kwargs, **blocks, interpret=bool(interpret), weight_fn=weight_fn)
    if backend not in ("gpu", "cpu", "cuda", "rocm"):
        raise NotImplementedError(f"no Pallas flash kernel for backend {backend!r}")
    return gpu.flash_attention_gpu(
        q, k, v, **kwargs, block_q=gpu.DEFAULT_BLOCK_Q if block_q is None else block_q,
        block_kv=gpu.DEFAULT_BLOCK_KV if block_kv is None else block_kv,
        interpret=default_interpret(interpret, backend, "flash"), weight_fn=weight_fn)


__all__ = ["flash_attention_pallas"]
