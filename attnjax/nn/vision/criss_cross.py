"""CCNet's criss-cross attention (CCA) and recurrent criss-cross attention (RCCA) as Flax NNX modules on NHWC
feature maps (functional core: ``attnjax.vision.criss_cross``).

Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019 / TPAMI 2020, sec. 3.2
(criss-cross attention) and sec. 3.3 (recurrent criss-cross attention). Official code: speedinghzl/CCNet,
``cc_attention/functions.py`` (``CrissCrossAttention``) and ``networks/ccnet.py`` (``RCCAModule``).
Claimed cost: against a non-local block, RCCA (R = 2) uses 11× less GPU memory and about 85% fewer FLOPs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.masks import Explicit
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.conv.dual_attention import conv1x1_weights
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.criss_cross import criss_cross_mask, recurrent_criss_cross


class CrissCrossAttention(nnx.Module):
    """Criss-cross attention module (CCNet sec. 3.2, eqs. 1-2, with the official code's learned ``γ``)::

        Q, K, V = 1×1 convs of x                      # Q, K: C' = C/r channels, V: C channels
        y_u = γ · Σ_{u' ∈ Ω_u} softmax_{u'}(Q_u·K_{u'}) V_{u'} + x_u

    ``Ω_u`` is pixel ``u``'s row and column, ``H + W − 1`` pixels with ``u`` counted once; one softmax over them
    (``attnjax.vision.criss_cross.criss_cross_attention``, ``O(H·W·(H + W))`` memory). No logit scaling (the paper
    and code use none: the core is called with ``scale=1.0``). CCNet is single-head; ``num_heads > 1`` splits
    ``C'`` and ``C`` into heads.

    Example::

      cca = CrissCrossAttention(512, rngs=nnx.Rngs(0))
      y = cca(x)                                     # x, y: [B, H, W, 512]; y == x at initialization (γ = 0)

    Parameters: ``2·C·C' + C²`` weights, ``C' + C`` biases and ``γ`` (``C' = max(1, C // r)``).

    The key convolution has no bias (the official one has): it adds ``Q_u·b_k`` to every logit of pixel ``u``,
    which the softmax cancels, so it never changes the output and its gradient is identically zero.

    Args:
      channels: ``C``.
      reduction: ``r``; Q and K have ``max(1, C // r)`` channels (8 in the official code).
      num_heads: heads (1 in CCNet); must divide ``C'`` and ``C``.
      gamma_init: ``γ`` at initialization (0 in the official code, so the module starts as the identity and the
        1×1 convolutions get zero gradients until ``γ`` moves).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the 1×1 convolutions (flax's ``nnx.Conv`` defaults).
    """

    def __init__(self, channels: int, *, reduction: int = 8, num_heads: int = 1, gamma_init: float = 0.0,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, reduction=reduction, num_heads=num_heads)
        reduced = max(1, channels // reduction)
        if reduced % num_heads or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the query/key channels max(1, channels // "
                             f"reduction) = {reduced} and channels = {channels}")
        self.channels, self.num_heads = channels, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.Conv(channels, reduced, (1, 1), **common)
        self.key = nnx.Conv(channels, reduced, (1, 1), use_bias=False, **common)
        self.value = nnx.Conv(channels, channels, (1, 1), **common)
        self.gamma = nnx.Param(jnp.full((), gamma_init, param_dtype))

    def loops(self, x: jax.Array, recurrence: int) -> jax.Array:
        """The module applied ``recurrence`` times with its (shared) weights: ``[B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        weights = (*conv1x1_weights(self.query), *conv1x1_weights(self.key), *conv1x1_weights(self.value),
                   self.gamma[...])
        if not is_capturing():
            return recurrent_criss_cross(x, *weights, num_heads=self.num_heads, recurrence=recurrence)
        for _ in range(recurrence):  # each loop's map: q, k over the H·W pixels, the criss-cross mask, scale 1
            self.record(x, *weights[:4])
            x = recurrent_criss_cross(x, *weights, num_heads=self.num_heads, recurrence=1)
        return x

    def record(self, x: jax.Array, wq: jax.Array, bq: Optional[jax.Array], wk: jax.Array,
               bk: Optional[jax.Array]) -> None:
        """Record one loop's attention for ``attnjax.analysis.capture_attention``: ``q, k [B, H·W, heads, C'/heads]``
        (the 1×1 maps of ``recurrent_criss_cross``), ``masks.Explicit(criss_cross_mask(H, W))`` (each pixel's
        row and column, itself once, as ``criss_cross_attention`` counts it), scale 1."""
        B, H, W, _ = x.shape
        project = lambda w, b: (x @ w.astype(x.dtype) + (0 if b is None else b.astype(x.dtype))).reshape(  # noqa
            B, H * W, self.num_heads, -1)
        sow_attention_inputs(self, project(wq, bq), project(wk, bk), mask=Explicit(jnp.asarray(criss_cross_mask(H, W))),
                             scale=1.0, mechanism="softmax")

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``: one criss-cross attention."""
        return self.loops(x, 1)


class RecurrentCrissCrossAttention(nnx.Module):
    """Recurrent criss-cross attention (RCCA, CCNet sec. 3.3): one ``CrissCrossAttention`` applied ``R`` times
    with shared weights, ``H'' = CCA(CCA(H))`` for ``R = 2``. After one loop a pixel has seen its row and column;
    after two, every pixel (a pixel ``(i', j')`` reaches ``(i, j)`` through ``(i, j')`` or ``(i', j)``).

    What "the RCCA module" holds: the paper's sec. 3.1 calls the shared-weight loops the recurrent criss-cross
    attention module; the reducing convolution before it (a 3×3 conv + BN to ``C/4`` channels, ``conva`` of the
    official ``RCCAModule``) and the fusion after it (3×3 conv + BN ``convb``, then concatenation with the
    backbone features and a bottleneck) are parts of CCNet's segmentation head, not of RCCA, and are left out;
    so the module maps ``[B, H, W, C] -> [B, H, W, C]`` and drops into any network.

    Example::

      rcca = RecurrentCrissCrossAttention(512, rngs=nnx.Rngs(0))
      y = rcca(x)                                    # x, y: [B, H, W, 512]

    Parameters: those of one ``CrissCrossAttention`` (the loops share them).

    Args:
      channels: ``C``.
      recurrence: ``R``, the number of loops (2 in the paper: full-image context at the lowest cost).
      reduction, num_heads, gamma_init, dtype, param_dtype, rngs: as ``CrissCrossAttention``.
    """

    def __init__(self, channels: int, *, recurrence: int = 2, reduction: int = 8, num_heads: int = 1,
                 gamma_init: float = 0.0, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(recurrence=recurrence)
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels, reduction=reduction, num_heads=num_heads, gamma_init=gamma_init,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``: ``R`` loops of the shared criss-cross attention."""
        return self.cca.loops(x, self.recurrence)


PAPER = "Huang et al. 2019, CCNet: Criss-Cross Attention for Semantic Segmentation (ICCV 2019, TPAMI 2020)"
# γ = 0.5, not the official 0: at γ = 0 the output is x and the 1×1 convolutions' gradients are exactly zero,
# which the conformance suite (a nonzero gradient for every parameter) would refuse; the official
# initialization is tested in tests/nn/vision/test_criss_cross.py.
register_module(ModuleSpec("criss_cross", CrissCrossAttention, dict(channels=16, gamma_init=0.5), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("rcca", RecurrentCrissCrossAttention, dict(channels=16, gamma_init=0.5), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
