"""Check an NNX module against a plain reference of its formula, forward and gradients.

The reference is a function of the module's parameters as a plain nested dict (``nnx.to_pure_dict`` of
its ``nnx.Param`` state, the names the module gives them) and of the inputs, written from the paper's
equation with ``jnp.einsum`` / ``lax.conv_general_dilated``. The check compares outputs, the gradient
of every parameter and the gradient of every floating-point input, compiled.

Example::

    def se_reference(p, x):  # Hu et al. 2018, eq. 2-4
        z = x.mean(axis=(1, 2))
        s = jax.nn.sigmoid(jax.nn.relu(z @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + ...)
        return x * s[:, None, None, :]

    check_module_against_reference(SqueezeExcite(16, rngs=nnx.Rngs(0)), se_reference, x)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.testing.numerics import assert_close, outputs_and_grads


def parameters(model: nnx.Module) -> dict:
    """The module's ``nnx.Param`` leaves as a plain nested dict, keyed as the module names them."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def parameter_count(model: nnx.Module) -> int:
    """The number of scalars in the module's ``nnx.Param`` leaves."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(parameters(model)))


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, stride: int = 1,
           padding: str | tuple = "SAME", dilation: int = 1, groups: int = 1) -> jax.Array:
    """A plain 2-D convolution for references: NHWC input, HWIO kernel ``[kh, kw, C // groups, C_out]``
    (``flax.nnx.Conv``'s layout), ``lax.conv_general_dilated`` at highest precision."""
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=padding,
                                     rhs_dilation=(dilation, dilation), feature_group_count=groups,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias


def check_module_against_reference(model: nnx.Module, reference: Callable[..., jax.Array], *inputs: Any,
                                   rtol: float = 2e-5, atol: float | None = None, call_kwargs: dict | None = None,
                                   seed: int = 123) -> None:
    """Assert ``model(*inputs) == reference(parameters(model), *inputs)``, and the same gradients.

    Args:
      model: the module; called as ``model(*inputs, **call_kwargs)``.
      reference: ``(params: dict, *inputs) -> output``, the paper's formula on the parameters as
        ``parameters(model)`` returns them.
      inputs: the positional inputs; the gradients of the floating-point arrays among them are compared.
      rtol, atol: tolerances of ``assert_close`` (relative RMS error, max absolute error).
      call_kwargs: keyword arguments of the module call (not differentiated).
      seed: the random cotangent ``w`` of the scalar ``sum(output * w)`` whose gradients are compared.

    The gradient of every parameter is compared: a parameter the reference doesn't read (a gradient
    of zero there against a nonzero one from the module) fails the check. The module's other state (e.g.
    BatchNorm statistics) goes into the compiled call as an argument, so a training-mode BatchNorm may
    update it there; ``model`` itself is left unchanged.
    """
    call_kwargs = call_kwargs or {}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    floats = [i for i, a in enumerate(inputs) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)]
    other = nnx.to_pure_dict(rest)

    def module_fn(p: dict, xs: list, o: dict) -> jax.Array:
        state, rest_state = nnx.State(params), nnx.State(rest)
        nnx.replace_by_pure_dict(state, p)
        nnx.replace_by_pure_dict(rest_state, o)
        args = list(inputs)
        for i, x in zip(floats, xs):
            args[i] = x
        return nnx.merge(graphdef, state, rest_state)(*args, **call_kwargs)

    def reference_fn(p: dict, xs: list, o: dict) -> jax.Array:
        args = list(inputs)
        for i, x in zip(floats, xs):
            args[i] = x
        return reference(p, *args)

    pure, xs = nnx.to_pure_dict(params), [inputs[i] for i in floats]
    key = jax.random.key(seed)
    (y, (gp, gx)), (y_ref, (gp_ref, gx_ref)) = (outputs_and_grads(fn, (pure, xs, other), (0, 1), key)
                                                for fn in (module_fn, reference_fn))
    assert_close(y, y_ref, rtol=rtol, atol=atol, name="output")
    flat, flat_ref = jax.tree_util.tree_flatten_with_path(gp)[0], jax.tree_util.tree_flatten_with_path(gp_ref)[0]
    assert [path for path, _ in flat] == [path for path, _ in flat_ref], "parameter trees differ"
    for (path, g), (_, g_ref) in zip(flat, flat_ref):
        assert_close(g, g_ref, rtol=rtol, atol=atol, name=f"d{jax.tree_util.keystr(path)}")
    for i, g, g_ref in zip(floats, gx, gx_ref):
        assert_close(g, g_ref, rtol=rtol, atol=atol, name=f"d(input {i})")


__all__ = ["parameters", "parameter_count", "conv2d", "check_module_against_reference"]
