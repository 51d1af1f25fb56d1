"""L²ViT's linear global attention (LGA) and local concentration module (LCM).

Zheng, "The Linear Attention Resurrection in Vision Transformer", arXiv 2501.16182 (2025), sec. 3
(enhanced linear attention and the LCM; official code ChuanyangZheng/L2ViT, ``classification/models/l2vit.py``).
Linear global attention over all ``N = H·W`` pixels, per head, with the ReLU kernel ``φ`` for non-negative
weights, a learned per-head temperature ``τ`` on the output and a floored normalizer::

    O_i = τ · φ(Q_i) (Σ_j φ(K_j)ᵀ V_j) / max(φ(Q_i)·Σ_j φ(K_j), c),         c = 100

The floor ``c`` is the official ``torch.clamp(q @ k.sum(-2), 1e2)`` ("clamp makes training stable and boost
performance as shown in our paper"); ``τ`` is the official ``temperature`` parameter (initialized to ``1/√D``:
"add scale on attn out is better than add scale on k"). The paper's text beyond its abstract was not available
here; the formulas follow the official code.

The LCM sharpens the dispersed linear attention with local context (``local_concentration``)::

    LCM(x) = DWConv₂(BN(GELU(DWConv₁(x))))           two 7 × 7 depth-wise convolutions with biases

Paths: ``linear_global_attention_reference`` forms the ``[N, N]`` matrix ``φ(Q)φ(K)ᵀ``;
``linear_global_attention`` multiplies right product first (``φ(K)ᵀV`` and ``φ(K)ᵀ1`` first): O(N·D·Dv) time,
an O(heads·D·Dv) state, no ``[N, N]`` array.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.checks import check_image_qkv, check_scalar, describe
from attnjax.dispatch import dispatch
from attnjax.vision.large_kernel import depthwise_conv

DENOMINATOR_FLOOR = 100.0
"""``c``: the official code clamps the normalizer ``φ(Q_i)·Σ_j φ(K_j)`` from below at ``1e2``."""


def check_lga_inputs(q: jax.Array, k: jax.Array, v: jax.Array, temperature: Union[None, float, jax.Array],
                     denominator_floor: float) -> jax.Array:
    """Validate LGA's inputs; return ``τ`` as float32 ``[heads]`` (``1/√D`` when ``temperature`` is None)."""
    _, _, _, heads, D = check_image_qkv(q, k, v)
    check_scalar("denominator_floor", denominator_floor)
    if not denominator_floor > 0:
        raise ValueError(f"denominator_floor must be positive, got {denominator_floor}")
    if temperature is None:
        return jnp.full((heads,), D ** -0.5, jnp.float32)
    if jnp.ndim(temperature) == 0:
        return jnp.full((heads,), temperature, jnp.float32)
    if jnp.shape(temperature) != (heads,):
        raise ValueError(f"temperature must be a scalar or have shape [heads] = [{heads}], got {describe(temperature)}")
    return jnp.asarray(temperature, jnp.float32)


def linear_global_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                      temperature: Union[None, float, jax.Array] = None, *,
                                      denominator_floor: float = DENOMINATOR_FLOOR) -> jax.Array:
    """LGA written plainly (L²ViT, sec. 3; official ``LinearAttention``) from the ``[N, N]`` ReLU-kernel weights.

    ``A = ReLU(Q) ReLU(K)ᵀ`` per head over the ``N = H·W`` pixels, ``O_i = τ_h Σ_j A_ij V_j / max(Σ_j A_ij, c)``,
    float32. Memory: the whole ``[B, heads, N, N]`` matrix.

    Args:
      q, k: ``[B, H, W, heads, D]`` (before the ReLU); v: ``[B, H, W, heads, Dv]``.
      temperature: ``τ``, a scalar or ``[heads]`` (differentiable); default ``1/√D``.
      denominator_floor: ``c > 0`` (100 in the official code).

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    tau = check_lga_inputs(q, k, v, temperature, denominator_floor)
    B, H, W, heads, _ = q.shape
    fq, fk, vf = (a.reshape(B, H * W, heads, a.shape[-1]).astype(jnp.float32) for a in (q, k, v))
    weights = jnp.einsum("bihc,bjhc->bhij", jax.nn.relu(fq), jax.nn.relu(fk), precision=jax.lax.Precision.HIGHEST)
    numerator = jnp.einsum("bhij,bjhd->bihd", weights, vf, precision=jax.lax.Precision.HIGHEST)
    denominator = jnp.maximum(weights.sum(-1), denominator_floor).transpose(0, 2, 1)[..., None]
    return (tau[:, None] * numerator / denominator).reshape(v.shape).astype(q.dtype)


def linear_global_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                            temperature: Union[None, float, jax.Array] = None, *,
                            denominator_floor: float = DENOMINATOR_FLOOR, implementation: str = "auto") -> jax.Array:
    """LGA (L²ViT, sec. 3), right product first: ``O = τ·φ(Q)(φ(K)ᵀV) / max(φ(Q)(φ(K)ᵀ1), c)``, ``φ = ReLU``.

    Per head, in float32 and heads-major layout (``[B, heads, N, ·]``, one transpose of each input and of the
    output): the state ``φ(K)ᵀV`` ``[D, Dv]`` and the key sum ``φ(K)ᵀ1`` ``[D]``, then one product per query; the
    floor and ``τ`` apply last. Cost: O(B·heads·N·D·Dv) time; memory O(B·heads·D·Dv) for the state plus float32
    heads-major copies of the inputs, no ``[N, N]`` array. (The heads-major layout keeps every contraction a plain
    batched matrix product: contracting ``[B, N, heads, D]`` in place made XLA transpose each operand to a
    token-minor layout, several strided passes over the sequence that cost 2-3x the products at N ≥ 2k on CPU.)

    Args:
      q, k: ``[B, H, W, heads, D]`` (before the ReLU); v: ``[B, H, W, heads, Dv]``.
      temperature: ``τ``, a scalar or ``[heads]`` (differentiable); default ``1/√D``.
      denominator_floor: ``c > 0`` (100 in the official code).
      implementation: "xla" (right product), "reference" (``linear_global_attention_reference``) or "auto" (xla).
    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    tau = check_lga_inputs(q, k, v, temperature, denominator_floor)

    def xla():
        B, H, W, heads, _ = v.shape
        fq, fk, vf = (a.reshape(B, H * W, heads, a.shape[-1]).astype(jnp.float32).transpose(0, 2, 1, 3)
                      for a in (q, k, v))                                                   # [B, heads, N, ·]
        fq, fk = jax.nn.relu(fq), jax.nn.relu(fk)
        state = jnp.einsum("bhnd,bhne->bhde", fk, vf)
        numerator = jnp.einsum("bhnd,bhde->bhne", fq, state)
        denominator = jnp.einsum("bhnd,bhd->bhn", fq, fk.sum(axis=2))
        out = tau[:, None, None] * numerator / jnp.maximum(denominator, denominator_floor)[..., None]
        return out.transpose(0, 2, 1, 3).reshape(v.shape)

    paths = {"reference": lambda: linear_global_attention_reference(q, k, v, temperature,
                                                                    denominator_floor=denominator_floor),
             "xla": xla}
    return dispatch(paths, implementation, what="linear global attention").astype(q.dtype)


def local_concentration(x: jax.Array, kernel1: jax.Array, bias1: Optional[jax.Array], kernel2: jax.Array,
                        bias2: Optional[jax.Array], *, norm: Optional[Callable[[jax.Array], jax.Array]] = None
                        ) -> jax.Array:
    """L²ViT's local concentration module (sec. 3; official ``LCM``): ``DWConv₂(norm(GELU(DWConv₁(x))))``.

    Two depth-wise convolutions (stride 1, zero padding ``⌊k/2⌋``, ``attnjax.vision.large_kernel.depthwise_conv``)
    with exact GELU and a normalization between them (the official code's ``BatchNorm2d``; the module passes its
    ``nnx.BatchNorm``). Cost O(B·H·W·C·(k₁² + k₂²)).

    Args:
      x: ``[B, H, W, C]``.
      kernel1, kernel2: ``[k, k, 1, C]`` depth-wise kernels (HWIO), odd ``k`` (7 in L²ViT).
      bias1, bias2: ``[C]`` or None.
      norm: a function ``[B, H, W, C] -> [B, H, W, C]`` applied after the GELU, or None for none.

    Returns:
      ``[B, H, W, C]``.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have shape [batch, height, width, channels], got {describe(x)}")
    C = x.shape[-1]
    for name, kernel in (("kernel1", kernel1), ("kernel2", kernel2)):
        if getattr(kernel, "ndim", None) != 4 or kernel.shape[2:] != (1, C):
            raise ValueError(f"{name} must have shape [k, k, 1, {C}] (depth-wise, HWIO) for x {describe(x)}, "
                             f"got {describe(kernel)}")
    for name, bias in (("bias1", bias1), ("bias2", bias2)):
        if bias is not None and jnp.shape(bias) != (C,):
            raise ValueError(f"{name} must have shape [{C}], got {describe(bias)}")
    h = jax.nn.gelu(depthwise_conv(x, kernel1, bias1), approximate=False)
    return depthwise_conv(h if norm is None else norm(h), kernel2, bias2)


__all__ = ["DENOMINATOR_FLOOR", "check_lga_inputs", "linear_global_attention_reference", "linear_global_attention",
           "local_concentration"]
