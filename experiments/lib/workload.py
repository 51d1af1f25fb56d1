"""What is measured: random q, k, v, and the two timed modes (the forward, or forward and gradients)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("fwd", "fwd_bwd")
"""What is timed: the forward, or the forward and the gradients wrt q, k, v."""


def random_qkv(key: jax.Array, batch: int, seq_len: int, heads: int, head_dim: int,
               dtype=jnp.float32, *, kv_len: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Standard-normal q ``[batch, seq_len, heads, head_dim]`` and k, v ``[batch, kv_len, heads, head_dim]``.

    ``kv_len`` defaults to ``seq_len`` (self-attention); another value gives cross-attention inputs.
    """
    kv_len = seq_len if kv_len is None else kv_len
    shapes = [(batch, n, heads, head_dim) for n in (seq_len, kv_len, kv_len)]
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                 for k, shape in zip(jax.random.split(key, 3), shapes))


def host_random_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.float32, *,
                    kv_len: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Like ``random_qkv``, but drawn on the host with numpy from an integer ``seed``.

    ``jax.random`` compiles a kernel for every new shape; harnesses that visit many shapes (CAB,
    the main job) save those compilations this way.
    """
    kv_len = seq_len if kv_len is None else kv_len
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, n, heads, head_dim), np.float32).astype(jnp.dtype(dtype)))
                 for n in (seq_len, kv_len, kv_len))


def grad_fn(fn: Callable) -> Callable:
    """``(q, k, v, w) -> (dq, dk, dv)``: the gradients of ``sum(fn(q, k, v) * w)``."""

    def loss(q, k, v, w):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    return jax.grad(loss, argnums=(0, 1, 2))


def mode_fn(fn: Callable, mode: str) -> Callable:
    """``fn`` itself for ``"fwd"``; its ``grad_fn`` for ``"fwd_bwd"``."""
    return fn if mode == "fwd" else grad_fn(fn)


def mode_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mode: str) -> tuple:
    """Arguments of ``mode_fn``: ``(q, k, v)``, plus a float32 cotangent ``w`` of ones for ``"fwd_bwd"``."""
    return (q, k, v) if mode == "fwd" else (q, k, v, jnp.ones(q.shape, jnp.float32))


def benchmark_inputs(seq_len: int, mode: str, args) -> tuple:
    """A benchmark's inputs at one length and mode: ``random_qkv`` seeded by ``seq_len``, then ``mode_inputs``.

    ``args``: the benchmark's flags (``cli.benchmark_parser``): ``batch``, ``heads``, ``head_dim``, ``dtype``.
    """
    qkv = random_qkv(jax.random.PRNGKey(seq_len), args.batch, seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
    return mode_inputs(*qkv, mode)
