"""Lightning Attention-2: causal chunked linear attention with a per-head scalar decay.

Qin et al. 2024, "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models" (and "Various Lengths, Constant Speed: Efficient Language Modeling with
Lightning Attention"; TransNormerLLM, Qin et al. 2023). Per head, with ``q`` already scaled::

    S_t = λ S_{t-1} + k_t v_tᵀ        (S_{-1} = initial_state)
    o_t = q_t S_t  =  Σ_{s≤t} λ^(t−s) (q_t · k_s) v_s + λ^(t+1) q_t S_{-1}

computed chunk by chunk (intra-chunk masked product plus inter-chunk ``Q·S``; the per-chunk math
is in :mod:`pallas_kernels.lightning.common`). The backward follows Lightning Attention-2's
Alg. 2: one forward sweep for dQ, one reverse sweep for dK, dV and the state cotangent.

The decay gradient is forward mode in ``a = log λ``: the dQ sweep also carries
``∂S/∂a`` (``∂S_t/∂a = λ ∂S_{t-1}/∂a + λ S_{t-1}``), so that
``dL/da = Σ_t dO_t · ∂O_t/∂a + ⟨dS_T, ∂S_T/∂a⟩`` is a sum of terms weighted by ``(i−j) λ^(i−j)``.
The shorter identity ``Σ_t (t+1)(q_t·dq_t − k_t·dk_t) + T⟨S_T, dS_T⟩`` cancels large terms and
loses ~1e-3 relative accuracy in f32 for strong decay, so it is not used.

Tested in ``tests/kernels/test_lightning.py`` against a naive quadratic masked form, forward and
backward (q, k, v, decay, initial_state, final_state), and against
``attnjax.linear.linear_attention`` when present.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from attnjax.meshes import vary_like
from pallas_kernels.common.interpret import default_interpret
from pallas_kernels.lightning import gpu, tpu

_BACKENDS = {"gpu": gpu, "tpu": tpu}


def lightning_attention_pallas(q, k, v, decay, *, scale=None, initial_state=None, chunk_size=64,
                               backend=None, interpret=None):
    """Causal linear attention with per-head decay, as a Pallas kernel with a custom VJP.

    Args:
      q: ``[B, T, H, Dk]``. k: ``[B, T, Hkv, Dk]``. v: ``[B, T, Hkv, Dv]``, with ``H % Hkv == 0``
        (q head ``h`` uses kv head ``h // (H // Hkv)``). f32 or bf16.
      decay: ``[H]``, λ in (0, 1]: weight λ^(i−j) from key j to query i (1 = no decay).
      scale: Python float multiplying q; defaults to ``1/sqrt(Dk)``.
      initial_state: ``[B, H, Dk, Dv]`` f32, or None for zeros.
      chunk_size: rows per chunk; T need not be a multiple (padded inside). On hardware, a
        multiple of 8, or 16 for bf16 (TPU), or a power of two ≥ 16 (GPU, where Dk and Dv must
        also be powers of two).
      backend: "gpu" (Triton) or "tpu" (Mosaic); default from ``jax.default_backend()``, and CPU
        runs the GPU kernel.
      interpret: run in interpret mode (GPU interpret, or TPU interpret via
        ``pltpu.InterpretParams``); default True exactly on CPU.

    Returns:
      ``(out, final_state)``: out ``[B, T, H, Dv]`` in q's dtype, final_state ``[B, H, Dk, Dv]``
      f32, the state after exactly T tokens. Differentiable in q, k, v, decay and initial_state.
    """
    B, T, H, Dk = _check(q, k, v, decay, initial_state, chunk_size)
    Dv = v.shape[-1]
    platform = jax.default_backend()
    backend = ("tpu" if platform == "tpu" else "gpu") if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or None, got {backend!r}")
    interpret = default_interpret(interpret, platform, "lightning")
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    s0 = jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    decay, s0 = vary_like((jnp.asarray(decay, jnp.float32), s0), q, k, v)  # per-device, like q/k/v under shard_map
    return _lightning(q, k, v, decay, s0, scale, int(chunk_size), backend, interpret)


def _check(q, k, v, decay, initial_state, chunk_size):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dk = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, Dk) or v.shape[:3] != (B, T, Hkv) or Hkv == 0 or H % Hkv:
        raise ValueError(f"expected k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] with H % Hkv == 0 for q {q.shape}; "
                         f"got k {k.shape}, v {v.shape}")
    if jnp.shape(decay) != (H,):
        raise ValueError(f"decay must have shape [H] = ({H},), got {jnp.shape(decay)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, v.shape[-1])}, "
                         f"got {initial_state.shape}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, Dk


def _pad(x, padded_len):
    return jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _lightning(q, k, v, decay, s0, scale, chunk, backend, interpret):
    return _forward(q, k, v, decay, s0, scale, chunk, backend, interpret)


def _forward(q, k, v, decay, s0, scale, chunk, backend, interpret):
    T = q.shape[1]
    padded = -(-T // chunk) * chunk
    out, st = _BACKENDS[backend].forward(
        _pad(q, padded), _pad(k, padded), _pad(v, padded), jnp.log(decay), s0,
        scale=scale, chunk=chunk, seq_len=T, interpret=interpret)
    return out[:, :T], st


def _lightning_fwd(q, k, v, decay, s0, scale, chunk, backend, interpret):
    return _forward(q, k, v, decay, s0, scale, chunk, backend, interpret), (q, k, v, decay, s0)


def _lightning_bwd(scale, chunk, backend, interpret, res, cotangents):
    q, k, v, decay, s0 = res
    do, dst = cotangents
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    padded = -(-T // chunk) * chunk
    dq, dk, dv, ds0, decay_rows, st_tangent = _BACKENDS[backend].backward(
        *(_pad(x, padded) for x in (q, k, v)), jnp.log(decay), s0, _pad(do.astype(q.dtype), padded),
        dst.astype(jnp.float32), scale=scale, chunk=chunk, seq_len=T, interpret=interpret)
    dk, dv = (x[:, :T].reshape(B, T, Hkv, H // Hkv, x.shape[-1]).sum(3) for x in (dk, dv))
    dlog_decay = jnp.sum(decay_rows, axis=0) + jnp.einsum("bhde,bhde->h", st_tangent, dst.astype(jnp.float32))
    return dq[:, :T].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlog_decay / decay, ds0


_lightning.defvjp(_lightning_fwd, _lightning_bwd)
