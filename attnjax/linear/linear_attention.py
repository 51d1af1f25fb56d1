"""Linear attention with feature maps, per-head decay, states and packed segments.

Causal, with per-query-head decay ``λ_h ∈ (0, 1]`` (``a = log λ``), feature map φ, and score scale
``σ`` (see ``feature_maps`` for where the scale goes)::

    o_i = σ φ(q_i) · S_i,     S_i = λ S_{i-1} + φ(k_i)ᵀ v_i,     S_{-1} = initial_state
        = Σ_{j≤i} λ^(i−j) σ φ(q_i)·φ(k_j) v_j  +  λ^(i+1) σ φ(q_i) S_{-1}

(Katharopoulos et al., "Transformers are RNNs", 2020; Qin et al., "Lightning Attention-2", 2024).
Non-causal (no decay): ``o_i = σ φ(q_i) (S_{-1} + Σ_j φ(k_j)ᵀ v_j)``, computed right-product first.

``normalize=True`` divides by ``σ φ(q_i)·z_i + eps`` where ``z_i`` is the same recurrence with
``v_j`` replaced by 1. It is carried as one extra value column: the state is then
``[B, Hq, Dk', Dv + 1]`` and its last column is ``z``.

Packed sequences (ScatterFormer, He et al. 2024; fla's ``cu_seqlens``): a segment is a maximal
run of equal ``segment_ids``; the state resets to zero where the id changes. ``initial_state``
feeds the row's first segment and ``final_state`` is the state after the row's last token (its
last segment), so a segment cut between two calls continues correctly.

Implementations: ``reference`` (quadratic, masked decay matrix ``M_ij = λ^(i−j)``), ``recurrent``
(``lax.scan`` over tokens; ``linear_attention_step`` is one step, for decoding), ``xla`` (chunked,
Lightning Attention-2: a scan over chunks, intra-chunk ``[(QKᵀ)⊙M]V`` plus inter-chunk ``Q·S``,
memory O(T·(Dk' + Dv)) plus one chunk's ``C × C`` scores),
``pallas`` (``pallas_kernels.lightning``: causal, no segments; the features and V enter the kernel
in q's dtype) and ``auto`` (pallas on GPU/TPU where it serves, else ``xla``). All accumulate in float32 with decays in log space.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import check_qkv, check_scalar, concrete_values
from attnjax.dispatch import dispatch
from attnjax.linear.feature_maps import FeatureMap, get_feature_map, is_softmax_kernel
from attnjax.meshes import accepts_explicit_meshes, vary_like
from attnjax.positional import alibi_slopes
from pallas_kernels.lightning import lightning_attention_pallas

NORMALIZER_EPS = 1e-6
"""Added to the normalizer ``σ φ(q)·z`` when ``normalize=True``."""


class LinearInputs(NamedTuple):
    """Prepared float32 operands, grouped by KV head (``G = Hq // Hkv`` query heads per KV head)."""

    fq: jax.Array                 # [B, T, Hkv, G, F]: σ·φ(q) (or φ(√σ q) for softmax kernels)
    fk: jax.Array                 # [B, S, Hkv, F]
    v: jax.Array                  # [B, S, Hkv, E], E = Dv (+1 with normalize: a ones column)
    log_decay: jax.Array          # [Hkv, G], log λ (zeros without decay)
    runs: Optional[jax.Array]     # [B, T] int32 run index of each token (segment starts counted)
    state: Optional[jax.Array]    # [B, Hkv, G, F, E] initial state


@accepts_explicit_meshes
def linear_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, feature_map: Union[str, FeatureMap] = "identity",
    causal: bool = True, normalize: bool = False, decay: Union[None, str, jax.Array] = None,
    scale: Optional[float] = None, chunk_size: int = 64, segment_ids: Optional[jax.Array] = None,
    cu_seqlens: Optional[jax.Array] = None, initial_state: Optional[jax.Array] = None,
    return_state: bool = False, implementation: str = "auto",
):
    """Linear attention ``o = φ(Q) · state`` (see the module docstring for the math).

    Args:
      q: ``[B, T, Hq, Dk]``; k: ``[B, S, Hkv, Dk]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``
        (query head ``h`` reads KV head ``h // (Hq // Hkv)``). Causal needs ``S == T``.
      feature_map: a name in ``feature_maps.FEATURE_MAPS`` ("identity", "elu+1", "relu",
        "performer", "taylor") or a callable ``[..., Dk] -> [..., Dk']``.
      causal: causal (recurrent) attention, else every query sees every key.
      normalize: divide by the normalizer ``σ φ(q_i)·z_i + eps`` (decayed like the values); meant
        for positive maps (elu+1, relu, performer, taylor): with identity it can cross zero.
      decay: ``None`` (λ = 1), a float ``[Hq]`` array of ``λ ∈ (0, 1]`` (differentiable), or
        ``"alibi"``: Lightning Attention's ``λ_h = exp(−m_h)`` with the ALiBi slopes
        ``m_h = 2^(−8h/Hq)`` (``positional.alibi_slopes``; OpenNLPLab ``_build_slope_tensor``).
        Causal only. Decays are per query head, so states are ``[B, Hq, Dk', ·]`` even with GQA.
      scale: ``σ``, default ``1/√Dk`` (Lightning's reference uses no scale: pass ``1.0``).
      chunk_size: chunk length ``C`` of the ``xla`` path: per token O(C·D) intra-chunk work and
        O(D²/C) state work (64 was fastest on CPU at D=64 among 32/64/128/256).
      segment_ids: int ``[B, T]`` packed-sequence ids; the state resets where the id changes.
      cu_seqlens: int ``[N + 1]`` cumulative sequence lengths (``0, ..., T``), batch 1 only.
      initial_state: float ``[B, Hq, Dk', Dv]`` (``Dv + 1`` with ``normalize``); default zeros.
      return_state: also return the float32 final state, same shape as ``initial_state``.
      implementation: "reference", "recurrent", "xla", "pallas" or "auto" (``attnjax.dispatch``:
        pallas on GPU/TPU when it serves the request, then xla).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, final_state)``.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x = prepare_inputs(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, decay=decay,
                       scale=scale, segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state)
    C = min(chunk_size, q.shape[1])
    paths = {
        "reference": lambda: _reference(x, causal),
        "recurrent": lambda: _recurrent(x) if causal else _refuse_noncausal(),
        "xla": lambda: _chunked(x, C) if causal else _noncausal(x, C),
        "pallas": lambda: _pallas(x, causal, chunk_size, q.dtype),
    }
    out, state = dispatch(paths, implementation, what="linear attention")
    out = _finish(out, normalize).astype(q.dtype)
    return (out, state.reshape(state.shape[0], -1, *state.shape[3:])) if return_state else out


def linear_attention_step(
    q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, state: Optional[jax.Array] = None, *,
    feature_map: Union[str, FeatureMap] = "identity", normalize: bool = False,
    decay: Union[None, str, jax.Array] = None, scale: Optional[float] = None,
):
    """One causal decoding step: ``S ← λ S + φ(k_t)ᵀ v_t``, ``o_t = σ φ(q_t) S``.

    Args:
      q_t: ``[B, Hq, Dk]``; k_t: ``[B, Hkv, Dk]``; v_t: ``[B, Hkv, Dv]``.
      state: float32 ``[B, Hq, Dk', Dv]`` (``Dv + 1`` with ``normalize``); ``None`` for zeros.
      feature_map, normalize, decay, scale: as in ``linear_attention``.
    Returns:
      ``(o_t [B, Hq, Dv] in q's dtype, new state)``. Equal, step by step, to ``linear_attention``.
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(t, "ndim", None) != 3:
            raise ValueError(f"{name} must have shape [batch, heads, dim], got {getattr(t, 'shape', None)}")
    out, state = linear_attention(q_t[:, None], k_t[:, None], v_t[:, None], feature_map=feature_map,
                                  normalize=normalize, decay=decay, scale=scale, initial_state=state,
                                  return_state=True, implementation="recurrent")
    return out[:, 0], state


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, length: int) -> jax.Array:
    """Segment ids ``[1, length]`` from cumulative lengths ``[N + 1]``: token t is in segment n iff
    ``cu[n] <= t < cu[n+1]``."""
    return (jnp.searchsorted(jnp.asarray(cu_seqlens), jnp.arange(length), side="right") - 1)[None].astype(jnp.int32)


def prepare_inputs(q, k, v, *, feature_map, causal, normalize, decay, scale, segment_ids, cu_seqlens,
             initial_state) -> LinearInputs:
    """Validate, apply the feature map and scale, resolve decay and segments, group heads."""
    check_qkv(q, k, v)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if causal and S != T:
        raise ValueError(f"causal linear attention needs as many keys as queries, got q {q.shape}, k {k.shape}")
    phi = get_feature_map(feature_map)
    scale = D ** -0.5 if scale is None else scale
    check_scalar("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if is_softmax_kernel(phi):
        root = scale ** 0.5
        fq, fk = phi(q.astype(jnp.float32) * root), phi(k.astype(jnp.float32) * root)
    else:
        fq, fk = phi(q) * scale, phi(k)
    fq, fk = fq.astype(jnp.float32), fk.astype(jnp.float32)
    F = fq.shape[-1]
    vf = v.astype(jnp.float32)
    if normalize:
        vf = jnp.concatenate([vf, jnp.ones_like(vf[..., :1])], axis=-1)
    E = vf.shape[-1]
    log_decay = checked_log_decay(decay, Hq, causal).reshape(Hkv, G)
    runs = _runs(segment_ids, cu_seqlens, B, T, S)
    state = None
    if initial_state is not None:
        expected = (B, Hq, F, E)
        if getattr(initial_state, "shape", None) != expected:
            raise ValueError(f"initial_state has shape {getattr(initial_state, 'shape', None)}, expected "
                             f"[B, Hq, Dk', Dv{' + 1' if normalize else ''}] = {expected} (Dk' = feature dim)")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise TypeError(f"initial_state must be floating-point, got {initial_state.dtype}")
        state = initial_state.astype(jnp.float32).reshape(B, Hkv, G, F, E)
    return LinearInputs(fq.reshape(B, T, Hkv, G, F), fk, vf, log_decay, runs, state)


def checked_log_decay(decay: Union[None, str, jax.Array], num_heads: int, causal: bool) -> jax.Array:
    """``log λ`` as float32 ``[Hq]`` from ``linear_attention``'s ``decay`` argument (None: no decay,
    "alibi", or λ ``[Hq]`` in ``(0, 1]``); checks the shape and dtype, and the range when the values
    are concrete (a caller about to trace ``decay``, e.g. into ``shard_map``, checks here first)."""
    if decay is None:
        return jnp.zeros((num_heads,), jnp.float32)
    if not causal:
        raise ValueError("decay needs causal=True (non-causal linear attention has no order to decay along)")
    if isinstance(decay, str):
        if decay != "alibi":
            raise ValueError(f"decay must be None, 'alibi' or a float array [Hq], got {decay!r}")
        return -jnp.asarray(alibi_slopes(num_heads))
    if jnp.shape(decay) != (num_heads,):
        raise ValueError(f"decay must have shape [Hq] = ({num_heads},), got {jnp.shape(decay)}")
    if not jnp.issubdtype(jnp.asarray(decay).dtype, jnp.floating):
        raise TypeError(f"decay must be a float array, got {jnp.asarray(decay).dtype}")
    values = concrete_values(decay)
    if values is not None and not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"decay [Hq] = {values.shape} must satisfy 0 < λ <= 1, got values in "
                         f"[{values.min():g}, {values.max():g}]")
    return jnp.log(jnp.asarray(decay, jnp.float32))



def _runs(segment_ids, cu_seqlens, B: int, T: int, S: int) -> Optional[jax.Array]:
    """Run index ``[B, T]`` (0 for the first run of a row, +1 at each id change), or None."""
    if cu_seqlens is not None:
        if segment_ids is not None:
            raise ValueError("pass segment_ids or cu_seqlens, not both")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got batch {B}")
        if getattr(cu_seqlens, "ndim", None) != 1 or not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise ValueError(f"cu_seqlens must be a 1-D int array [N + 1], got {getattr(cu_seqlens, 'shape', None)}")
        values = concrete_values(cu_seqlens)
        if values is not None and (values[0] != 0 or values[-1] != T or np.any(np.diff(values) < 0)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {values.size} values from {values[0]} to "
                             f"{values[-1]}{'' if np.all(np.diff(values) >= 0) else ', falling somewhere'}")
        segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, T)
    if segment_ids is None:
        return None
    if S != T:
        raise ValueError(f"segments need as many keys as queries, got T={T}, S={S}")
    if getattr(segment_ids, "shape", None) != (B, T):
        raise ValueError(f"segment_ids has shape {getattr(segment_ids, 'shape', None)}, expected [B, T] = {(B, T)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


def _refuse_noncausal():
    raise NotImplementedError("the recurrent implementation is causal only; use 'xla' or 'reference'")


def _finish(out: jax.Array, normalize: bool) -> jax.Array:
    """``[B, T, Hkv, G, E] -> [B, T, Hq, Dv]``, dividing by the normalizer column if present."""
    out = out.reshape(*out.shape[:2], -1, out.shape[-1])
    return out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS) if normalize else out


def _reference(x: LinearInputs, causal: bool):
    """Quadratic form: ``o = [(σ φ(Q) φ(K)ᵀ) ⊙ M] V`` with ``M_ij = λ^(i−j)`` on allowed pairs."""
    fq, fk, v, a, runs, state0 = x
    B, T, Hkv, G, _ = fq.shape
    S = fk.shape[1]
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    allowed = jnp.broadcast_to(j <= i if causal else True, (1, T, S))
    if runs is not None:
        allowed = allowed & (runs[:, :, None] == runs[:, None, :])
    dist = (i - j).astype(jnp.float32) if causal else jnp.zeros((T, S), jnp.float32)
    log_m = jnp.where(allowed[:, None, None], a[None, :, :, None, None] * dist, -jnp.inf)   # [B,Hkv,G,T,S]
    scores = jnp.einsum("bthgf,bshf->bhgts", fq, fk) * jnp.exp(log_m)
    out = jnp.einsum("bhgts,bshe->bthge", scores, v)

    # Final state: keys of the row's last segment, decayed to position S-1.
    last = jnp.broadcast_to(True, (1, S)) if runs is None else runs == runs[:, -1:]
    dist_end = (S - 1 - jnp.arange(S)).astype(jnp.float32) if causal else jnp.zeros((S,), jnp.float32)
    w_end = jnp.where(last[:, None, None], jnp.exp(a[..., None] * dist_end), 0.0)                  # [B,Hkv,G,S]
    state = jnp.einsum("bshf,bshe,bhgs->bhgfe", fk, v, w_end)
    if state0 is not None:
        first = jnp.ones((1, T), bool) if runs is None else runs == 0
        t1 = (jnp.arange(T) + 1).astype(jnp.float32) if causal else jnp.zeros((T,), jnp.float32)
        w0 = jnp.where(first[:, :, None, None], jnp.exp(a * t1[:, None, None]), 0.0)              # [B,T,Hkv,G]
        out = out + jnp.einsum("bthgf,bhgfe->bthge", fq, state0) * w0[..., None]
        keep = jnp.ones((1,), bool) if runs is None else runs[:, -1] == 0
        total = jnp.exp(a * (S if causal else 0))
        state = state + jnp.where(keep[:, None, None, None, None], total[..., None, None] * state0, 0.0)
    return out, state


def _recurrent(x: LinearInputs):
    """One token at a time: ``S ← λ S (reset at segment starts) + φ(k_t)ᵀ v_t``, ``o_t = σ φ(q_t) S``."""
    fq, fk, v, a, runs, state0 = x
    B, T, Hkv, G, F = fq.shape
    E = v.shape[-1]
    keep = jnp.ones((T, 1), bool) if runs is None else jnp.concatenate(
        [jnp.ones((1, B), bool), (runs[:, 1:] == runs[:, :-1]).T], axis=0)                         # [T, B|1]
    lam = jnp.exp(a)[..., None, None]

    def step(s, inputs):
        q_t, k_t, v_t, keep_t = inputs
        s = jnp.where(keep_t[:, None, None, None, None], lam * s, 0.0)
        s = s + jnp.einsum("bhf,bhe->bhfe", k_t, v_t)[:, :, None]
        return s, jnp.einsum("bhgf,bhgfe->bhge", q_t, s)

    s0 = vary_like(jnp.zeros((B, Hkv, G, F, E), jnp.float32) if state0 is None else state0, fq, fk, v, a, runs)
    state, out = jax.lax.scan(step, s0, (fq.swapaxes(0, 1), fk.swapaxes(0, 1), v.swapaxes(0, 1), keep))
    return out.swapaxes(0, 1), state


def _chunked(x: LinearInputs, C: int):
    """Lightning Attention-2 in XLA: a ``lax.scan`` over chunks of ``C`` carrying the f32 state.

    Per chunk with inclusive cumulative log decay ``L_r`` (padding tokens decay by 0):
    ``o_r = Σ_{s≤r} e^(L_r−L_s) (q_r·k_s) v_s + e^(L_r) q_r S_prev`` and
    ``S = e^(L_{C−1}) S_prev + Σ_s e^(L_{C−1}−L_s) k_sᵀ v_s``. With segments, intra pairs must share a
    run, ``S_prev`` reaches only queries of the run open at the chunk start, and the state keeps
    only the chunk's last run. Exponents are ≤ 0 or masked to −inf, so nothing overflows.

    One step holds one chunk's ``C × C`` scores, so memory is O(T·(F + E)) plus O(C²) per step; the
    step is rematerialized in the backward pass (``jax.checkpoint``), which then keeps only the
    per-chunk states ``[N, B, Hkv, G, F, E]`` instead of every chunk's scores.
    """
    fq, fk, v, a, runs, state0 = x
    B, T, Hkv, G, F = fq.shape
    E = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T

    def chunks(t):
        """``[B, T, Hkv, ..., X] -> [N, B, Hkv, ..., C, X]``, zero padded to ``N·C`` tokens."""
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)).reshape(B, N, C, *t.shape[2:])
        return jnp.moveaxis(t, (1, 2), (0, -2))

    valid = (jnp.arange(N * C) < T).astype(jnp.float32).reshape(N, 1, 1, C)
    cum = jnp.cumsum(valid * a[..., None], axis=-1)                             # [N, Hkv, G, C]
    causal = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]
    if runs is None:
        segments = None
    else:
        r = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge").reshape(B, N, C)
        opening = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), r[:, :-1, -1]], axis=1)  # run open at chunk start
        segments = (r.swapaxes(0, 1), opening.T)                                  # [N, B, C], [N, B]

    def step(s, inputs):
        q, k, u, log_cum, seg = inputs            # [B, Hkv, G, C, F], [B, Hkv, C, F], [B, Hkv, C, E], [Hkv, G, C]
        total = log_cum[..., -1:]                                               # [Hkv, G, 1]
        intra_ok, inter_ok, last_ok, keep = causal, True, True, True
        if seg is not None:
            run, open_run = seg                                                 # [B, C], [B]
            intra_ok = causal & (run[:, None, None, :, None] == run[:, None, None, None, :])
            inter_ok = (run == open_run[:, None])[:, None, None]                # [B, 1, 1, C]
            last_ok = (run == run[:, -1:])[:, None, None]
            keep = (run[:, -1] == open_run)[:, None, None, None, None]
        log_m = jnp.where(intra_ok, log_cum[..., :, None] - log_cum[..., None, :], -jnp.inf)  # [B|1, Hkv, G, C, C]
        scores = jnp.einsum("bhgrf,bhsf->bhgrs", q, k) * jnp.exp(log_m)
        w_in = jnp.where(inter_ok, jnp.exp(log_cum), 0.0)[..., None]            # [B|1, Hkv, G, C, 1]
        out = jnp.einsum("bhgrs,bhse->bhgre", scores, u) + jnp.einsum("bhgrf,bhgfe->bhgre", q, s) * w_in
        w_end = jnp.where(last_ok, jnp.exp(total - log_cum), 0.0)[..., None]   # [B|1, Hkv, G, C, 1]
        update = jnp.einsum("bhgsf,bhse->bhgfe", k[:, :, None] * w_end, u)
        s = jnp.where(keep, jnp.exp(total)[..., None] * s, 0.0) + update
        return s, out

    s0 = vary_like(jnp.zeros((B, Hkv, G, F, E), jnp.float32) if state0 is None else state0, fq, fk, v, a, runs)
    xs = (chunks(fq), chunks(fk), chunks(v), cum, segments)
    state, out = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), s0, xs)  # out: [N, B, Hkv, G, C, E]
    return jnp.moveaxis(out, (0, 4), (1, 2)).reshape(B, N * C, Hkv, G, E)[:, :T], state


def _pallas(x: LinearInputs, causal: bool, chunk_size: int, dtype):
    """``pallas_kernels.lightning`` (causal, no segments); features and V in q's dtype, state f32."""
    if not causal or x.runs is not None:
        raise NotImplementedError("the Pallas lightning kernel serves causal attention without segments only")
    B, T, Hkv, G, F = x.fq.shape
    state0 = None if x.state is None else x.state.reshape(B, Hkv * G, F, -1)
    out, state = lightning_attention_pallas(
        x.fq.reshape(B, T, Hkv * G, F).astype(dtype), x.fk.astype(dtype), x.v.astype(dtype),
        jnp.exp(x.log_decay).reshape(-1), scale=1.0, initial_state=state0, chunk_size=chunk_size)
    return out.astype(jnp.float32).reshape(B, T, Hkv, G, -1), state.reshape(B, Hkv, G, F, -1)


def _noncausal(x: LinearInputs, C: int):
    """``o = σ φ(Q) (S_0 + φ(K)ᵀ V)``, right product first. With segments: a forward and a backward
    causal chunked pass (no decay) minus the double-counted diagonal."""
    fq, fk, v, a, runs, state0 = x
    if runs is None:
        kv = jnp.einsum("bshf,bshe->bhfe", fk, v)[:, :, None]
        state = kv if state0 is None else kv + state0
        state = jnp.broadcast_to(state, (*state.shape[:2], fq.shape[3], *state.shape[3:]))
        return jnp.einsum("bthgf,bhgfe->bthge", fq, state), state
    forward, state = _chunked(x, C)
    flipped = LinearInputs(fq[:, ::-1], fk[:, ::-1], v[:, ::-1], a, runs[:, ::-1], None)
    backward, _ = _chunked(flipped, C)
    diagonal = jnp.einsum("bthgf,bthf,bthe->bthge", fq, fk, v)
    return forward + backward[:, ::-1] - diagonal, state


__all__ = ["linear_attention", "linear_attention_step", "segment_ids_from_cu_seqlens", "checked_log_decay",
           "NORMALIZER_EPS"]
