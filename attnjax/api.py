"""``attnjax.attention``: one entry point for every registered mechanism and implementation.

Inputs are checked here, once: shapes and dtypes (``attnjax.checks``), then the mechanism's
``supports`` gate, the one place that refuses an option a mechanism does not define. An
implementation is then called with only the options in use (a mechanism that supports no bias never
sees a ``bias`` argument), through the one fallback loop (``attnjax.dispatch``).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.checks import check_options, check_qkv
from attnjax.dispatch import check_implementation, dispatch
from attnjax.masks import Mask
from attnjax.meshes import accepts_explicit_meshes


@accepts_explicit_meshes
def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mechanism: Union[str, registry.Mechanism] = "softmax",
    mask: Optional[Mask] = None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None, implementation: str = "auto",
    return_lse: bool = False,
):
    """Attention of queries ``q`` over keys ``k`` and values ``v``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hk, D]``; v: ``[B, S, Hv, Dv]``; ``Hq % Hk == 0`` and
        ``Hq % Hv == 0`` (query head ``h`` uses K head ``h // (Hq // Hk)`` and V head
        ``h // (Hq // Hv)``; K/V are never repeated). ``Hk != Hv`` is the "kv_heads" option
        (DiffQKV, Lin et al. 2025, "Sigma": differentially compressed K and V).
      mechanism: a registry name (``attnjax.registry.entries()``) or a config object.
      mask: an ``attnjax.masks`` value (bottom-right aligned when ``T != S``).
      bias: an array broadcastable to ``[B, Hq, T, S]`` or a rule such as
        ``attnjax.positional.ALiBi``.
      scale: logit scale, default ``1/sqrt(D)``.
      logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)``.
      sinks: ``[Hq]`` per-head sink logits.
      dropout_rate, rng: attention dropout; ``rng`` is required when the rate is positive.
      implementation: "reference", "xla", "pallas" or "auto" (the first of pallas (GPU/TPU only),
        xla, reference that serves the request).
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``. ``B``, ``T`` or ``S`` may be 0: with
      no keys every row outputs 0 (log-sum-exp ``-inf``, or the sink logit).
    Raises:
      ValueError/TypeError for bad input; NotImplementedError when the requested
      implementation can't serve the request.
    """
    check_implementation(implementation)
    config = registry.resolve(mechanism)
    check_qkv(q, k, v, kv_heads=True)
    check_options(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                  dropout_rate=dropout_rate, rng=rng)
    _check_supported(config, q, k, v, mask=mask, bias=bias, logits_soft_cap=logits_soft_cap, sinks=sinks,
                     dropout_rate=dropout_rate, return_lse=return_lse)
    if 0 in (q.shape[0], q.shape[1], k.shape[1]):
        return _no_keys_result(q, v, sinks, return_lse)
    used = {name: value for name, value in (("mask", mask), ("bias", bias), ("scale", scale),
                                            ("logits_soft_cap", logits_soft_cap), ("sinks", sinks))
            if value is not None}
    if dropout_rate > 0:
        used.update(dropout_rate=dropout_rate, rng=rng)
    if return_lse:
        used["return_lse"] = True
    return dispatch(config.implementations(), implementation, q, k, v, what=f"mechanism {config.name!r}", **used)


def _no_keys_result(q, v, sinks, return_lse: bool):
    """The result when ``B``, ``T`` or ``S`` is 0: every row sees no key, so outputs 0 (and
    log-sum-exp ``-inf``, or the sink logit), as a masked-out row does in every mechanism."""
    B, T, Hq, _ = q.shape
    out = jnp.zeros((B, T, Hq, v.shape[-1]), q.dtype)
    if not return_lse:
        return out
    floor = -jnp.inf if sinks is None else jnp.asarray(sinks, jnp.float32)
    return out, jnp.broadcast_to(floor, (B, T, Hq)).astype(jnp.float32)


def _check_supported(config, q, k, v, *, mask, bias, logits_soft_cap, sinks, dropout_rate, return_lse) -> None:
    used = {
        "mask": mask is not None, "bias": bias is not None, "logits_soft_cap": logits_soft_cap is not None,
        "sinks": sinks is not None, "dropout": dropout_rate > 0, "return_lse": return_lse,
        "gqa": q.shape[2] != k.shape[2] or q.shape[2] != v.shape[2], "kv_heads": k.shape[2] != v.shape[2],
        "cross": q.shape[1] != k.shape[1],
    }
    missing = sorted(o for o, on in used.items() if on and o not in config.supports)
    if missing:
        raise NotImplementedError(f"mechanism {config.name!r} does not support {missing}")
