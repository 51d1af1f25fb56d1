"""Numerical test helpers: random inputs, closeness with an absolute-or-relative-RMS bound, gradients.

Used by attnjax's own test suite and the conformance checks, and public so that a user testing a
model built on attnjax compares outputs the same way (flash-linear-attention's ``assert_close``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
"""Default relative-RMS tolerance per input dtype (bf16/fp16 differ by rounding of P and V)."""


def random_qkv(key, B: int = 2, T: int = 33, S: int | None = None, Hq: int = 4, Hkv: int | None = None, D: int = 16,
               Dv: int | None = None, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` from a standard normal
    (drawn by NumPy, seeded by ``key``)."""
    S = T if S is None else S
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    rng = numpy_rng(key)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, Dv)))
    return q, k, v


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key: test inputs without compiling ``jax.random`` per shape."""
    data = key if jnp.issubdtype(jnp.asarray(key).dtype, jnp.unsignedinteger) else jax.random.key_data(key)
    return np.random.default_rng(np.asarray(data).ravel().tolist())


def assert_close(actual, expected, *, atol: float | None = None, rtol: float | None = None, name: str = ""):
    """Pass if ``max|a - e| <= atol`` or the relative RMS error ``‖a - e‖ / ‖e‖ <= rtol``.

    Like flash-linear-attention's check: an absolute bound for values near zero, else a
    relative RMS bound that tolerates a few rounding outliers in low precision.
    """
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values in actual"
    rtol = TOLERANCE[jnp.float32] if rtol is None else rtol
    atol = rtol * 1e-2 if atol is None else atol
    abs_err = float(np.max(np.abs(a - e))) if a.size else 0.0
    if abs_err <= atol:
        return
    rel_rms = float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))
    assert rel_rms <= rtol, f"{name}: max abs err {abs_err:.3g} > {atol:.3g} and relative RMS {rel_rms:.3g} > {rtol:.3g}"


def grads(fn: Callable, args: Sequence, argnums: Sequence[int], key=None):
    """Gradients of ``sum(fn(*args) * w)`` for a fixed random cotangent ``w``, compiled (the gradient of an
    un-jitted function runs op by op, several times slower in interpret-mode kernels)."""
    key = jax.random.PRNGKey(123) if key is None else key
    out = jax.eval_shape(fn, *args)
    w = jax.random.normal(key, out.shape, jnp.float32)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * w)

    return jax.jit(jax.grad(loss, argnums=tuple(argnums)))(*args)


def outputs_and_grads(fn: Callable, args: Sequence, argnums: Sequence[int], key=None):
    """``(fn(*args), grads(fn, args, argnums, key))`` from one compiled function: the gradient's forward pass
    gives the output, so a test that checks both compiles once instead of twice."""
    key = jax.random.PRNGKey(123) if key is None else key
    out = jax.eval_shape(fn, *args)
    w = jax.random.normal(key, out.shape, jnp.float32)

    def loss(*a):
        y = fn(*a)
        return jnp.sum(y.astype(jnp.float32) * w), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums), has_aux=True))(*args)
    return y, g


def assert_outputs_and_grads_close(fn_actual: Callable, fn_expected: Callable, args: Sequence,
                                   argnums: Sequence[int], *, rtol: float | None = None,
                                   names: Sequence[str] | None = None):
    """Compare the outputs and the gradients of two functions of the same arguments (one compile each)."""
    (ya, ga), (ye, ge) = (outputs_and_grads(fn, args, argnums) for fn in (fn_actual, fn_expected))
    assert_close(ya, ye, rtol=rtol, name="out")
    names = names or [f"arg{i}" for i in argnums]
    for a, e, n in zip(ga, ge, names):
        assert_close(a, e, rtol=rtol, name=f"d{n}")


def assert_grads_close(fn_actual: Callable, fn_expected: Callable, args: Sequence, argnums: Sequence[int],
                       *, rtol: float | None = None, names: Sequence[str] | None = None):
    """Compare gradients of two functions of the same arguments."""
    ga = grads(fn_actual, args, argnums)
    ge = grads(fn_expected, args, argnums)
    names = names or [f"arg{i}" for i in argnums]
    for a, e, n in zip(ga, ge, names):
        assert_close(a, e, rtol=rtol, name=f"d{n}")


__all__ = ["TOLERANCE", "random_qkv", "numpy_rng", "assert_close", "grads", "outputs_and_grads", "assert_grads_close",
           "assert_outputs_and_grads_close"]
