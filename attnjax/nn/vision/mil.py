"""Attention-based MIL pooling as Flax NNX modules: ABMIL and ACMIL (functional core: ``attnjax.vision.mil``).

``AttentionMILPooling`` is ABMIL's (gated) attention pooling (Ilse et al., ICML 2018); ``ACMILPooling`` is ACMIL's
multiple-branch attention with stochastic top-K instance masking (Zhang et al., ECCV 2024). Both pool a bag of
instances ``x [B, N, C]`` (padded bags: ``valid`` bool ``[B, N]``) to ``[B, C]``; the classifiers on top, and the
instance embedding before (ABMIL's and ACMIL's ``DimReduction``: a bias-free linear layer and a ReLU), are left to
the model.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.mil import attention_mil_pooling, check_topk, mil_attention_logits, stochastic_topk_instance_mask


class ACMILOutput(NamedTuple):
    """What ``ACMILPooling.pool`` returns.

    Attributes:
      bag: ``[B, C]``, the slide feature pooled with the branches' mean attention map (``mean_m z_m``).
      branches: ``[B, M, C]``, each branch's pooled feature ``z_m`` (ACMIL trains a classifier on each).
      attention: ``float32 [B, M, N]``, the branches' softmax maps after masking (the input of
        ``attnjax.vision.mil.acmil_diversity_loss``).
    """

    bag: jax.Array
    branches: jax.Array
    attention: jax.Array


class GatedAttentionLogits(nnx.Module):
    """The attention network of ABMIL/ACMIL: ``s_{m,n} = w_mᵀ (tanh(V h_n + b_V) ⊙ σ(U h_n + b_U))`` (Ilse et al.
    2018, eq. 9), or ``w_mᵀ tanh(V h_n + b_V)`` without the gate (eq. 8), for ``M`` branches.

    ``V`` and ``U`` have biases as in the official code (``nn.Linear``); ``w`` has none (the official bias on the
    last layer shifts every logit of a bag equally, which the softmax over the bag ignores).

    Parameters: ``(C + 1)·L`` (``V``) ``+ (C + 1)·L`` (``U``, gated) ``+ L·M`` (``w``).

    Args:
      dim: ``C``; hidden: ``L`` (128 in ABMIL's and ACMIL's code); branches: ``M``; gated: eq. 9 (True) or 8.
      param_dtype: the parameters' dtype (the logits are computed in float32).
      rngs: ``params`` initializes the layers (flax's ``nnx.Linear`` defaults).
    """

    def __init__(self, dim: int, *, hidden: int = 128, branches: int = 1, gated: bool = True,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(dim=dim, hidden=hidden, branches=branches)
        self.dim = dim
        common = dict(param_dtype=param_dtype, rngs=rngs)
        self.v = nnx.Linear(dim, hidden, **common)
        self.u = nnx.Linear(dim, hidden, **common) if gated else None
        self.w = nnx.Linear(hidden, branches, use_bias=False, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, N, C] -> float32 logits [B, M, N]``."""
        check_input("x", x, self.dim)
        gate = {} if self.u is None else dict(u_kernel=self.u.kernel[...], u_bias=self.u.bias[...])
        return mil_attention_logits(x, self.v.kernel[...], self.v.bias[...], self.w.kernel[...], **gate)


class AttentionMILPooling(nnx.Module):
    """ABMIL attention pooling: ``z = Σ_n a_n h_n``, ``a = softmax_n(wᵀ(tanh(V h_n) ⊙ σ(U h_n)))`` (Ilse et al.,
    "Attention-based Deep Multiple Instance Learning", ICML 2018, eqs. 7 and 9; eq. 8 with ``gated=False``).

    Example::

      pool = AttentionMILPooling(512, rngs=nnx.Rngs(0))
      z = pool(h, valid)                       # h: [B, N, 512], valid: bool [B, N] -> z: [B, 512]

    Parameters: as ``GatedAttentionLogits`` with ``M = 1``.

    Args:
      dim: ``C``, the instances' width; hidden: ``L`` (128 in the official code); gated: eq. 9 (True) or eq. 8.
      param_dtype, rngs: as ``GatedAttentionLogits``. The weights are float32; ``z`` takes ``x``'s dtype.
    """

    def __init__(self, dim: int, *, hidden: int = 128, gated: bool = True, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.logits = GatedAttentionLogits(dim, hidden=hidden, gated=gated, param_dtype=param_dtype, rngs=rngs)

    def attention(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """The attention weights ``a``, ``float32 [B, N]`` (0 on padding)."""
        return attention_mil_pooling(x, self.logits(x), valid=valid)[1][:, 0]

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, N, C] -> z [B, C]``; ``valid`` bool ``[B, N]`` excludes padding instances."""
        return attention_mil_pooling(x, self.logits(x), valid=valid)[0][:, 0]


class ACMILPooling(nnx.Module):
    """ACMIL pooling: multiple-branch attention (MBA) with stochastic top-K instance masking (STKIM) (Zhang et al.,
    "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification", ECCV 2024).

    ``M`` gated-attention branches share ``V`` and ``U`` and have one ``w_m`` each. In training each branch drops
    a random ``⌊K·p⌋`` of its top-``K`` instances from its softmax (``attnjax.vision.mil.topk_instance_mask``, the
    rule of the official ``ACMIL_GA``); branch ``m`` pools ``z_m = Σ_n a_{m,n} h_n`` and the slide feature is
    ``z = Σ_n mean_m(a_{m,n}) h_n = mean_m z_m``. ``pool`` also returns the branch features (ACMIL puts a classifier
    on each) and the masked maps (for ``attnjax.vision.mil.acmil_diversity_loss``).

    Randomness follows ``nnx.Dropout``: masking is on by default and off with ``deterministic=True`` (at
    construction, at call time, after ``model.eval()`` or in ``nnx.view(model, deterministic=True)``); its keys
    come from ``rng`` at call time, else from the ``dropout`` (or ``default``) stream of the constructor's
    ``rngs`` (with neither, a training call raises ``ValueError``).

    Example::

      acmil = ACMILPooling(128, rngs=nnx.Rngs(0))
      out = acmil.pool(h, valid)                    # training: STKIM on
      loss = ce(head(out.bag)) + sum(ce(head_m(out.branches[:, m])) ...) + acmil_diversity_loss(out.attention)
      z = acmil(h, valid, deterministic=True)       # inference: [B, 128]

    Parameters: as ``GatedAttentionLogits`` with ``M = num_branches``.

    Args:
      dim: ``C``; num_branches: ``M`` (5 in the paper's runs); hidden: ``L`` (128); gated: gated attention (ACMIL_GA).
      top_k: ``K`` (10) and mask_drop: ``p`` (0.6), the STKIM settings of the official README.
      deterministic: the default for calls without ``deterministic``.
      param_dtype: the parameters' dtype (attention in float32; the features take ``x``'s dtype).
      rngs: ``params`` initializes the layers; ``dropout`` (or ``default``) seeds the masking.
    """

    def __init__(self, dim: int, *, num_branches: int = 5, hidden: int = 128, gated: bool = True, top_k: int = 10,
                 mask_drop: float = 0.6, deterministic: bool = False, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_topk(top_k, mask_drop)
        self.top_k, self.mask_drop, self.deterministic = top_k, float(mask_drop), deterministic
        self.logits = GatedAttentionLogits(dim, hidden=hidden, branches=num_branches, gated=gated,
                                           param_dtype=param_dtype, rngs=rngs)
        has_stream = "dropout" in rngs or "default" in rngs
        self.rngs = rngs.dropout.fork() if mask_drop > 0 and has_stream else None

    def pool(self, x: jax.Array, valid: Optional[jax.Array] = None, *, deterministic: Optional[bool] = None,
             rng: Optional[jax.Array] = None) -> ACMILOutput:
        """``x [B, N, C]`` -> ``ACMILOutput(bag [B, C], branches [B, M, C], attention [B, M, N])``.

        Args:
          valid: bool ``[B, N]``, False on padding instances.
          deterministic: True turns STKIM off; None uses ``self.deterministic``.
          rng: a key for STKIM; None draws one from the module's stream.
        """
        logits = self.logits(x)
        deterministic = self.deterministic if deterministic is None else deterministic
        dropped = None
        if not deterministic and self.mask_drop > 0:
            if rng is None and self.rngs is None:
                raise ValueError("ACMILPooling masks instances in training (deterministic=False): pass rng=key, or "
                                 "build it with rngs holding a 'dropout' (or 'default') stream")
            key = self.rngs() if rng is None else rng
            dropped = stochastic_topk_instance_mask(logits, self.top_k, self.mask_drop, rng=key, valid=valid)
        branches, attention = attention_mil_pooling(x, logits, valid=valid, dropped=dropped)
        return ACMILOutput(jnp.mean(branches.astype(jnp.float32), axis=1).astype(x.dtype), branches, attention)

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None, *, deterministic: Optional[bool] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """The slide feature ``[B, C]`` (``pool(...).bag``)."""
        return self.pool(x, valid, deterministic=deterministic, rng=rng).bag

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by ``nnx.view``: ``deterministic=True`` turns STKIM off."""
        if deterministic is not None:
            self.deterministic = deterministic


def bag_example(key: jax.Array) -> tuple:
    """Two bags of 12 instances ``[2, 12, 16]``, the second padded after 9 (``valid [2, 12]``)."""
    return jax.random.normal(key, (2, 12, 16)), jnp.arange(12)[None, :] < jnp.array([[12], [9]])


PAPER_ABMIL = "Ilse et al. 2018 (Attention-based Deep Multiple Instance Learning, ICML)"
PAPER_ACMIL = "Zhang et al. 2024 (ACMIL, ECCV)"
register_module(ModuleSpec("gated_attention_logits", GatedAttentionLogits, dict(dim=16, hidden=8, branches=3),
                           lambda key: bag_example(key)[:1], kind="other", paper=PAPER_ABMIL))
register_module(ModuleSpec("abmil_gated", AttentionMILPooling, dict(dim=16, hidden=8), bag_example, kind="other",
                           paper=PAPER_ABMIL))
register_module(ModuleSpec("abmil", AttentionMILPooling, dict(dim=16, hidden=8, gated=False), bag_example,
                           kind="other", paper=PAPER_ABMIL))
register_module(ModuleSpec("acmil", ACMILPooling, dict(dim=16, hidden=8, num_branches=3, top_k=4), bag_example,
                           kind="other", paper=PAPER_ACMIL, call_kwargs=dict(deterministic=True)))
