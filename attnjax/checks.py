"""Input validation with messages that name the argument, the shape seen and the shape expected."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.bias import as_bias
from attnjax.masks import Mask


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_heads: bool = False) -> None:
    """Check the ``[B, T, H, D]`` layout contract shared by every mechanism.

    q ``[B, T, Hq, D]``, k ``[B, S, Hk, D]``, v ``[B, S, Hv, Dv]``, one floating dtype for all three,
    ``Hq % Hk == 0`` and ``Hq % Hv == 0``. Without ``kv_heads``, K and V share one head count
    (``Hk == Hv``, the usual GQA/MQA); with it (the ``"kv_heads"`` option of ``attnjax.attention``:
    DiffQKV, Lin et al. 2025, "Sigma") they may differ, and query head ``h`` reads K head
    ``h // (Hq // Hk)`` and V head ``h // (Hq // Hv)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "ndim") or x.ndim != 4:
            shape = getattr(x, "shape", None)
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != D:
        raise ValueError(f"k head_dim {k.shape[3]} != q head_dim {D}: q {q.shape}, k {k.shape}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must agree on seq: k {k.shape}, v {v.shape} (expected v [B, S, Hv, Dv])")
    Hk, Hv = k.shape[2], v.shape[2]
    if Hk != Hv and not kv_heads:
        raise ValueError(f"k and v must agree on [seq, heads]: k {k.shape}, v {v.shape} (expected v [B, S, Hkv, Dv]; "
                         "separate K and V head counts are the 'kv_heads' option of attnjax.attention)")
    for name, x in (("kv", k),) if Hk == Hv else (("k", k), ("v", v)):
        if Hq % x.shape[2]:
            raise ValueError(f"q heads ({Hq}) must be a multiple of {name} heads ({x.shape[2]}): q {q.shape}, "
                             f"{name[0]} {x.shape}")


def check_qk(q: jax.Array, k: jax.Array, *, where: str = "") -> None:
    """The ``[B, T, Hq, D]`` / ``[B, S, Hkv, D]`` contract of computations on queries and keys alone (attention
    maps and their statistics, cache selection): rank 4, floating, same B and D, ``Hq % Hkv == 0``. ``where``
    prefixes the message (e.g. ``"layer 2: "``)."""
    for name, x in (("q", q), ("k", k)):
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"{where}{name} must have rank 4 [batch, seq, heads, head_dim], got {describe(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{where}{name} must be a floating-point array, got dtype {x.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{where}q [B, T, Hq, D] and k [B, S, Hkv, D] must share B and D with Hq % Hkv == 0, got q "
                         f"{list(q.shape)}, k {list(k.shape)}")


def check_image_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int]:
    """``(B, H, W, heads, D)`` of image-like q, k ``[B, H, W, heads, D]`` and v ``[B, H, W, heads, Dv]``;
    ``ValueError`` naming the argument unless they share ``[B, H, W, heads]`` (and q, k the head dim),
    ``TypeError`` unless they are floating point."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 5:
            raise ValueError(f"{name} must have shape [batch, height, width, heads, head_dim], got {describe(a)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {describe(a)}")
    if q.shape[:4] != k.shape[:4] or k.shape[:4] != v.shape[:4] or q.shape[4] != k.shape[4]:
        raise ValueError(f"q, k, v must share [batch, height, width, heads] (and q, k head_dim): "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    return q.shape


def check_options(q: jax.Array, k: jax.Array, *, mask, bias, scale, logits_soft_cap, sinks,
                  dropout_rate: float, rng: Optional[jax.Array]) -> None:
    """Check the score options of ``attnjax.attention`` against the shapes of q and k."""
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be an attnjax.masks value (e.g. masks.Causal()), got {type(mask).__name__}; "
                            "wrap a boolean array as masks.Explicit(array)")
        mask.check(B, Hq, T, S)
    if bias is not None:
        as_bias(bias).check(B, Hq, T, S)
    for name, value in (("scale", scale), ("logits_soft_cap", logits_soft_cap), ("dropout_rate", dropout_rate)):
        if value is not None:
            check_scalar(name, value)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
    if sinks is not None and jnp.shape(sinks) != (Hq,):
        raise ValueError(f"sinks must have shape [Hq] = ({Hq},), got {jnp.shape(sinks)}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0 and rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs an rng (a jax.random key)")


def check_positive(**values: object) -> None:
    """``ValueError`` unless every value is a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {describe(value)}")


def describe(value: object) -> str:
    """``value`` for an error message: ``repr`` of a Python value, ``dtype[shape] array`` of an array
    (never its values)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {value.dtype}{list(value.shape)} array"
    return repr(value)


def concrete_values(x) -> Optional[np.ndarray]:
    """``x`` as a NumPy array, or None when it is traced (its values are unknown until run time);
    for checks that can only look at values known at trace time."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_scalar(name: str, value: object) -> None:
    """``ValueError``/``TypeError`` naming ``name`` unless ``value`` is a concrete real number (a Python
    number or a 0-d array with a known value): options such as ``scale`` are static."""
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got {describe(value)}")
    try:
        float(value)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(f"{name} must be a concrete number, got a traced value ({describe(value)}); under jit pass "
                        "it as a Python float (a static argument)") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
