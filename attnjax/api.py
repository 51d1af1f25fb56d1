"""``attnjax.attention``: one entry point for every registered mechanism and implementation.

Inputs are checked here, once: shapes and dtypes (``attnjax.checks``), then the mechanism's
``supports`` gate, the one place that refuses an option a mechanism does not define. An
implementation is then called with only the options in use (a mechanism that supports no bias never
sees a ``bias`` argument), through the one fallback loop (``attnjax.dispatch``).
"""

from __future__ import annotations

from typing import Optional, Union

import jax

from attnjax import registry
from attnjax.checks import check_options, check_qkv
from attnjax.dispatch import check_implementation, dispatch
from attnjax.masks import Mask
from attnjax.meshes import on_auto_axes


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mechanism: Union[str, registry.Mechanism] = "softmax",
    mask: Optional[Mask] = None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None, implementation: str = "auto",
    return_lse: bool = False,
):
    """Attention of queries ``q`` over keys ``k`` and values ``v``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``
        (query head ``h`` uses KV head ``h // (Hq // Hkv)``; K/V are never repeated).
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
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    Raises:
      ValueError/TypeError for bad input; NotImplementedError when the requested
      implementation can't serve the request.
    """
    check_implementation(implementation)
    config = registry.resolve(mechanism)
    check_qkv(q, k, v)
    check_options(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                  dropout_rate=dropout_rate, rng=rng)
    _check_supported(config, q, k, mask=mask, bias=bias, logits_soft_cap=logits_soft_cap, sinks=sinks,
                     dropout_rate=dropout_rate, return_lse=return_lse)
    used = {name: value for name, value in (("mask", mask), ("bias", bias), ("scale", scale),
                                            ("logits_soft_cap", logits_soft_cap), ("sinks", sinks))
            if value is not None}
    if dropout_rate > 0:
        used.update(dropout_rate=dropout_rate, rng=rng)
    if return_lse:
        used["return_lse"] = True
    paths = config.implementations()
    return on_auto_axes(lambda q, k, v, **kw: dispatch(paths, implementation, q, k, v, what=f"mechanism {config.name!r}", **kw),
                        q, k, v, **used)


def _check_supported(config, q, k, *, mask, bias, logits_soft_cap, sinks, dropout_rate, return_lse) -> None:
    used = {
        "mask": mask is not None, "bias": bias is not None, "logits_soft_cap": logits_soft_cap is not None,
        "sinks": sinks is not None, "dropout": dropout_rate > 0, "return_lse": return_lse,
        "gqa": q.shape[2] != k.shape[2], "cross": q.shape[1] != k.shape[1],
    }
    missing = sorted(o for o, on in used.items() if on and o not in config.supports)
    if missing:
        raise NotImplementedError(f"mechanism {config.name!r} does not support {missing}")
