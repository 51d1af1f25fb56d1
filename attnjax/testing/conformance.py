"""Conformance checks generated from the registry: every fast path against its reference.

In the spirit of tokamax's ``AttentionTestBase``: a mechanism added to ``attnjax.registry`` gets
these checks without writing any. For a config and one of its implementations, ``cases(config)``
builds small requests from what the config claims in ``supports`` (odd lengths that are not
multiples of the tiles, which ``small_tiles`` shrinks to 8; causal when masks are supported; GQA;
K and V with different head counts and head dims; cross-attention with ``T < S``; an array bias, a
logit soft cap, sinks, the log-sum-exp; dropout in a case of its own), and
``check_against_reference`` runs the request through ``attnjax.attention`` (the public entry: checks,
the ``supports`` gate, dispatch) under ``jax.jit`` and compares the output and the gradients (q, k,
v, and the bias and sinks when present) with the ``reference`` implementation's. ``check_bf16``
runs a bfloat16 request and ``check_vmap`` a ``jax.vmap`` over an extra batch axis, and
``check_sharded`` a data-parallel run inside ``jax.shard_map`` and under ``jax.jit`` on a mesh with
Explicit axes.

A request that the reference itself does not define (a decayed linear mechanism without a causal
mask, stick-breaking without one) raises ``CaseNotDefined``; a fast path that refuses a request
the reference serves raises ``NotImplementedError`` (as "auto" expects). Tests report both as
skips with the reason; anything else that differs is an ``AssertionError``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.testing.numerics import assert_close

TILE = 8
"""Tile, block and chunk size that ``small_tiles`` gives a config (lengths below are not multiples)."""

RTOL = {"float32": 1e-4}
"""Relative-RMS bound of a fast path against the reference, float32 inputs."""

SEED = 0


class CaseNotDefined(Exception):
    """The reference does not define this request (e.g. a causal-only mechanism without a mask)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One request: shapes ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``, ``v [B, S, Hv, Dv]`` and options
    (``Hv``: V's head count, ``None`` = ``Hkv``; another value is the "kv_heads" option)."""

    name: str
    B: int = 2
    T: int = 21
    S: int = 21
    Hq: int = 4
    Hkv: int = 4
    D: int = 8
    Dv: int = 8
    Hv: Optional[int] = None
    causal: bool = False
    bias: bool = False
    logits_soft_cap: Optional[float] = None
    sinks: bool = False
    return_lse: bool = False
    dropout_rate: float = 0.0


def cases(config) -> tuple[Case, ...]:
    """The requests a config is checked on by default, from its ``supports``.

    ``plain``: no option, odd length. ``core``: the shape options every path of a family tends to
    share (causal mask, GQA ``Hq = 2·Hkv``, cross-attention ``T < S``), so that a path that refuses
    one of the score options below is still checked. ``claimed``: every option the config claims at
    once except dropout (adds the bias, soft cap, sinks, lse). ``dropout``: causal with dropout,
    when claimed. ``kv_heads``: K and V with different head counts that don't nest (``Hq = 6``,
    ``Hk = 2``, ``Hv = 3``: query head ``h`` reads K head ``h // 3`` and V head ``h // 2``) and
    ``Dv != D``, when claimed (DiffQKV, Lin et al. 2025, "Sigma"). ``option_cases`` has one case per
    claimed option (the slow sweep).
    """
    supports = config.supports
    core = Case("core", causal="mask" in supports, Hkv=2 if "gqa" in supports else 4,
                S=29 if "cross" in supports else 21)
    claimed = dataclasses.replace(
        core, name="claimed", bias="bias" in supports, logits_soft_cap=5.0 if "logits_soft_cap" in supports else None,
        sinks="sinks" in supports, return_lse="return_lse" in supports)
    out = [Case("plain"), core, claimed]
    if "dropout" in supports:
        out.append(Case("dropout", causal="mask" in supports, dropout_rate=0.25))
    if "kv_heads" in supports:
        out.append(_kv_heads_case(supports))
    return tuple(out)


def _kv_heads_case(supports) -> Case:
    """The "kv_heads" request: ``Hq = 6`` query heads over ``Hk = 2`` K heads and ``Hv = 3`` V heads
    with ``Dv = 6``, causal and cross where claimed."""
    return Case("kv_heads", causal="mask" in supports, Hq=6, Hkv=2, Hv=3, Dv=6, S=29 if "cross" in supports else 21)


def option_cases(config) -> tuple[Case, ...]:
    """One case per option the config claims (causal where masks are supported, so that
    causal-only mechanisms are defined), for a sweep that pins a failure to one option."""
    supports = config.supports
    causal = "mask" in supports
    one = {"mask": Case("mask", causal=True), "gqa": Case("gqa", causal=causal, Hkv=2),
           "cross": Case("cross", causal=causal, S=29), "bias": Case("bias", causal=causal, bias=True),
           "logits_soft_cap": Case("logits_soft_cap", causal=causal, logits_soft_cap=5.0),
           "sinks": Case("sinks", causal=causal, sinks=True),
           "return_lse": Case("return_lse", causal=causal, return_lse=True),
           "dropout": Case("dropout", causal=causal, dropout_rate=0.25), "kv_heads": _kv_heads_case(supports)}
    return tuple(case for option, case in one.items() if option in supports)


def small_tiles(config):
    """``config`` with its tile fields (``block_q``, ``block_kv``, ``chunk_size``) set to ``TILE``
    where it has them and accepts the value, so that the checked lengths span several tiles."""
    if not dataclasses.is_dataclass(config):
        return config
    names = {f.name for f in dataclasses.fields(config)} & {"block_q", "block_kv", "chunk_size"}
    try:
        return dataclasses.replace(config, **{n: TILE for n in names})
    except (ValueError, TypeError):
        return config


def inputs(case: Case, dtype=jnp.float32) -> dict:
    """The arrays of a case, drawn by NumPy from a fixed seed: q, k, v, and bias/sinks/rng when used."""
    rng = np.random.default_rng(SEED)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    Hv = case.Hkv if case.Hv is None else case.Hv
    arrays = {"q": normal(case.B, case.T, case.Hq, case.D), "k": normal(case.B, case.S, case.Hkv, case.D),
              "v": normal(case.B, case.S, Hv, case.Dv)}
    if case.bias:
        arrays["bias"] = normal(1, case.Hq, case.T, case.S)
    if case.sinks:
        arrays["sinks"] = normal(case.Hq).astype(jnp.float32)
    return arrays


def _call(config, implementation: str, case: Case) -> Callable:
    """``f(arrays) -> {"out", "lse"?}`` through ``attnjax.attention``."""
    options = dict(mechanism=config, implementation=implementation, return_lse=case.return_lse,
                   mask=masks.Causal() if case.causal else None, logits_soft_cap=case.logits_soft_cap)
    if case.dropout_rate:
        options.update(dropout_rate=case.dropout_rate, rng=jax.random.PRNGKey(SEED))

    def f(arrays):
        result = attention(arrays["q"], arrays["k"], arrays["v"], bias=arrays.get("bias"), sinks=arrays.get("sinks"),
                           **options)
        out, lse = result if case.return_lse else (result, None)
        return {"out": out} if lse is None else {"out": out, "lse": lse}

    return f


def _loss_weights(config, implementation: str, case: Case, f: Callable, arrays: dict) -> dict:
    """Fixed random weights ``w`` of the loss ``Σ out·w (+ Σ lse·w')``, shaped like ``f``'s outputs.
    Raises ``CaseNotDefined`` when the reference refuses the request, ``NotImplementedError`` when
    this path refuses it."""
    try:
        shapes = jax.eval_shape(f, arrays)
    except NotImplementedError as e:
        if implementation == "reference":
            raise CaseNotDefined(f"{config.name}: the reference does not define case {case.name!r}: {e}") from None
        raise
    return {n: jnp.asarray(np.random.default_rng(SEED + 1 + i).standard_normal(s.shape, np.float32))
            for i, (n, s) in enumerate(sorted(shapes.items()))}


def defines(config, case: Case) -> bool:
    """Whether the reference defines ``case`` for ``config``: traced only (``jax.eval_shape``), nothing compiles."""
    try:
        _loss_weights(config, "reference", case, _call(config, "reference", case), inputs(case))
    except CaseNotDefined:
        return False
    return True


def _with_grads(f: Callable) -> Callable:
    """``(arrays, weights) -> {outputs, "d<name>": gradient of Σ out·w (+ Σ lse·w') per array}``."""
    def outputs_and_grads(arrays, weights):
        def loss(arrays):
            results = f(arrays)
            total = sum(jnp.sum(jnp.where(jnp.isfinite(r), r, 0.0).astype(jnp.float32) * weights[n])
                        for n, r in results.items())
            return total, results

        grads, results = jax.grad(loss, has_aux=True)(arrays)
        return {**results, **{f"d{n}": g for n, g in grads.items()}}

    return outputs_and_grads


def compiled_outputs_and_grads(config, implementation: str, case: Case, dtype=jnp.float32):
    """``(compiled, arrays)``: ``compiled(arrays)`` returns the outputs and the gradients of
    ``Σ out·w (+ Σ lse·w')`` for fixed random ``w`` (one compilation; its ``memory_analysis()`` gives
    the peak). Raises ``CaseNotDefined`` when the reference refuses the request,
    ``NotImplementedError`` when this path refuses it."""
    arrays = inputs(case, dtype)
    f = _call(config, implementation, case)
    weights = _loss_weights(config, implementation, case, f, arrays)
    run = _with_grads(f)
    return jax.jit(lambda arrays: run(arrays, weights)).lower(arrays).compile(), arrays


def outputs_and_grads(config, implementation: str, case: Case, dtype=jnp.float32) -> dict:
    """``{"out", "lse"?, "dq", "dk", "dv", "dbias"?, "dsinks"?}`` of one path on one case (see
    ``compiled_outputs_and_grads``)."""
    compiled, arrays = compiled_outputs_and_grads(config, implementation, case, dtype)
    return compiled(arrays)


_REFERENCE_CACHE: dict = {}


def reference_outputs(config, case: Case) -> dict:
    """``outputs_and_grads`` of the reference, cached by ``(repr(config), case)``: shared by every
    implementation's check of the same request."""
    key = (repr(config), case)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = outputs_and_grads(config, "reference", case)
    return _REFERENCE_CACHE[key]


def _comparable(expected: dict, actual: dict, where: str) -> dict:
    """Float32 NumPy pairs by output name; −inf lse rows (no key) must agree and are compared as 0."""
    assert set(actual) == set(expected), f"{where}: returns {sorted(actual)}, reference {sorted(expected)}"
    pairs = {}
    for name in sorted(expected):
        e, a = np.asarray(expected[name], np.float32), np.asarray(actual[name], np.float32)
        if name == "lse":
            assert np.array_equal(np.isfinite(e), np.isfinite(a)), f"{where}: lse infinities differ"
            e, a = np.where(np.isfinite(e), e, 0.0), np.where(np.isfinite(a), a, 0.0)
        pairs[name] = (a, e)
    return pairs


def check_against_reference(config, implementation: str, case: Case, *, rtol: Optional[float] = None) -> None:
    """Assert that ``implementation`` gives the reference's output, lse and gradients on ``case``."""
    where = f"{config.name}/{implementation}/{case.name}"
    pairs = _comparable(reference_outputs(config, case), outputs_and_grads(config, implementation, case), where)
    rtol = RTOL["float32"] if rtol is None else rtol
    for name, (a, e) in pairs.items():
        assert_close(a, e, rtol=rtol, atol=rtol * 1e-2, name=f"{where}/{name}")


def relative_errors(config, implementation: str, case: Case, dtype=jnp.float32, expected: Optional[dict] = None
                    ) -> dict[str, float]:
    """``‖actual − reference‖ / ‖reference‖`` of each output and gradient (for reports; tests use
    ``check_against_reference``). ``expected``: the reference's ``outputs_and_grads`` if already computed."""
    expected = outputs_and_grads(config, "reference", case, dtype) if expected is None else expected
    pairs = _comparable(expected, outputs_and_grads(config, implementation, case, dtype),
                        f"{config.name}/{implementation}/{case.name}")
    return {name: float(np.linalg.norm(a - e) / max(float(np.linalg.norm(e)), 1e-30)) for name, (a, e) in pairs.items()}


def check_sharded(config, implementation: str, case: Case, mesh, *, mode: str, axis: str = "data") -> None:
    """Data parallel over ``mesh`` axis ``axis``, the request gives the reference's single-device
    outputs and gradients.

    ``mode="shard_map"``: inside the user's ``jax.shard_map`` (default ``check_vma``) on the batch
    shards. ``mode="jit"``: under ``jax.jit`` on arrays sharded over the batch (a ``jax.make_mesh``
    mesh has Explicit axes). The case must hold batch-shaped arrays only (no bias or sinks), with
    ``B`` a multiple of the axis size.
    """
    if case.bias or case.sinks:
        raise ValueError(f"check_sharded needs batch-shaped arrays only; case {case.name!r} has a bias or sinks")
    arrays = inputs(case)
    f = _call(config, implementation, case)
    weights = _loss_weights(config, implementation, case, f, arrays)
    run = _with_grads(f)
    spec = jax.sharding.PartitionSpec(axis)
    put = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(mesh, spec))
    if mode == "shard_map":
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    elif mode != "jit":
        raise ValueError(f"mode must be 'shard_map' or 'jit', got {mode!r}")
    actual = jax.jit(run)(jax.tree.map(put, arrays), jax.tree.map(put, weights))
    where = f"{config.name}/{implementation}/{case.name}/{mode}"
    for name, (a, e) in _comparable(reference_outputs(config, case), actual, where).items():
        assert_close(a, e, rtol=RTOL["float32"], atol=RTOL["float32"] * 1e-2, name=f"{where}/{name}")


def check_bf16(config, implementation: str, case: Case) -> None:
    """A bfloat16 request gives a finite bfloat16 output (statistics stay in float32)."""
    arrays = inputs(case, jnp.bfloat16)
    try:
        results = jax.jit(_call(config, implementation, case))(arrays)
    except NotImplementedError as e:
        if implementation == "reference":
            raise CaseNotDefined(f"{config.name}: the reference does not define case {case.name!r}: {e}") from None
        raise
    assert results["out"].dtype == jnp.bfloat16, f"{config.name}/{implementation}: out dtype {results['out'].dtype}"
    assert bool(jnp.all(jnp.isfinite(results["out"].astype(jnp.float32)))), f"{config.name}/{implementation}: bf16 NaN/inf"


def check_vmap(config, implementation: str, case: Case) -> None:
    """``jax.vmap`` over an extra leading axis equals calling on each slice."""
    arrays = {n: a for n, a in inputs(case).items() if n in ("q", "k", "v")}
    f = _call(config, implementation, dataclasses.replace(case, bias=False, sinks=False))
    stacked = {n: jnp.stack([a, a[::-1]]) for n, a in arrays.items()}
    try:
        batched = jax.jit(jax.vmap(f))(stacked)
    except NotImplementedError as e:
        if implementation == "reference":
            raise CaseNotDefined(f"{config.name}: the reference does not define case {case.name!r}: {e}") from None
        raise
    one = jax.jit(f)
    for i in range(2):
        single = one({n: a[i] for n, a in stacked.items()})
        for name in single:
            assert_close(batched[name][i], single[name], rtol=RTOL["float32"], name=f"{config.name}/vmap/{name}")


__all__ = ["Case", "CaseNotDefined", "RTOL", "TILE", "cases", "option_cases", "check_against_reference", "check_bf16",
           "check_vmap", "check_sharded", "compiled_outputs_and_grads", "defines", "inputs", "outputs_and_grads",
           "reference_outputs",
           "relative_errors", "small_tiles"]
