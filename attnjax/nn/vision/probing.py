"""Efficient attentive probing as a Flax NNX module (functional core: ``attnjax.vision.probing``)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.probing import efficient_probing, efficient_probing_weights


class AttentiveProbe(nnx.Module):
    """Efficient probing (EP): ``y_j = Σ_n softmax_n(q_jᵀ x_n / √D) W_v^jᵀ x_n``, ``y = [y_1; …; y_M]``
    (Psomas et al., "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling", arXiv 2506.10178,
    2025, Fig. 1).

    ``M`` learnable queries attend to the frozen tokens directly (no query, key or output projection; see
    ``attnjax.vision.probing`` for the equivalence with a multi-head attentive probe), and one value projection
    ``W_v [D, D/d_out]`` is split into ``M`` column blocks, one per query. A linear classifier on ``y`` completes the
    probe (the official head: ``nn.Linear(D // d_out, num_classes)``). The paper claims "up to a 10× speed-up over
    conventional multi-head attention".

    Example::

      probe = AttentiveProbe(768, rngs=nnx.Rngs(0))
      y = probe(tokens)                          # tokens: [B, N, 768] -> y: [B, 768]
      maps = probe.attention(tokens)             # [B, 32, N]

    Parameters: ``M·D`` (queries) ``+ D·D/d_out`` (``W_v``).

    Args:
      dim: ``D``, the token features' width.
      num_queries: ``M`` (32 in the official code).
      d_out: the output width is ``D / d_out`` (1 in the official code); ``D / d_out`` must be a multiple of ``M``.
      implementation: passed to ``attnjax.vision.probing.efficient_probing``.
      dtype: computation dtype (default: the input's); param_dtype: parameter dtype.
      rngs: ``params`` draws the queries (normal, std 0.02, as the official code) and ``W_v`` (flax default).
    """

    def __init__(self, dim: int, *, num_queries: int = 32, d_out: int = 1, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(dim=dim, num_queries=num_queries, d_out=d_out)
        if dim % d_out or (dim // d_out) % num_queries:
            raise ValueError(f"dim / d_out must be an integer multiple of num_queries: dim={dim}, d_out={d_out}, "
                             f"num_queries={num_queries}")
        self.dim, self.num_queries, self.implementation, self.dtype = dim, num_queries, implementation, dtype
        self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_queries, dim), param_dtype))
        self.value = nnx.Linear(dim, dim // d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(queries [M, D], W_v [D, D/d_out])`` cast to ``dtype``."""
        return self.queries[...].astype(dtype), self.value.kernel[...].astype(dtype)

    def attention(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """The queries' attention maps ``float32 [B, M, N]`` (the paper's interpretable maps)."""
        check_input("x", x, self.dim)
        return efficient_probing_weights(x, self.queries[...].astype(x.dtype), valid=valid)

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, N, D] -> [B, D/d_out]``; ``valid`` bool ``[B, N]`` masks padding tokens."""
        check_input("x", x, self.dim)
        dtype = x.dtype if self.dtype is None else self.dtype
        if is_capturing():  # M learned queries over the tokens, one head of width D
            queries = self.queries[...].astype(dtype)
            q = jnp.broadcast_to(queries, (x.shape[0], *queries.shape))[:, :, None]
            sow_attention_inputs(self, q, x.astype(dtype)[:, :, None], mask=None if valid is None else
                                 masks.Explicit.keys(valid), scale=None, mechanism="softmax")
        return efficient_probing(x.astype(dtype), *self.weights(dtype), valid=valid,
                                 implementation=self.implementation)


def probe_example(key: jax.Array) -> tuple:
    """Tokens ``[2, 9, 16]``."""
    return (jax.random.normal(key, (2, 9, 16)),)


register_module(ModuleSpec("attentive_probe", AttentiveProbe, dict(dim=16, num_queries=4), probe_example,
                           kind="other", paper="Psomas et al. 2025 (Efficient Probing, arXiv 2506.10178)"))
