"""BiLevelRoutingAttention (BiFormer, catalog B8): the layer equals the same math written with the reference
functions (forward and every parameter's gradient), on a map its regions don't tile; argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn import BiLevelRoutingAttention
from attnjax.sparse.biformer import biformer_attention_reference
from tests.helpers import assert_close

C, HEADS = 8, 2


def reference_layer(params, x, *, n_win, top_k):
    """The official forward (``bra_nchw.py``/``bra_legacy.py``) from the layer's parameters, with the reference
    functions: qkv projection, Eqs. (2)-(5) with LCE, scale ``C^-1/2``, output projection."""
    B, H, W, _ = x.shape
    qkv = x @ params["qkv"]["kernel"] + params["qkv"]["bias"]
    q, k, v = (t.reshape(B, H * W, HEADS, C // HEADS) for t in jnp.split(qkv, 3, axis=-1))
    out = biformer_attention_reference(q, k, v, grid=(H, W), region=(max(1, H // n_win), max(1, W // n_win)),
                                       top_k=top_k, scale=C ** -0.5, lce_kernel=params["lce_kernel"],
                                       lce_bias=params["lce_bias"])
    return out.reshape(B, H, W, C) @ params["out"]["kernel"] + params["out"]["bias"]


def _plain(state):
    return jax.tree.map(lambda p: p[...], nnx.to_pure_dict(state))


def test_layer_matches_the_reference_layer_forward_and_parameter_grads():
    layer = BiLevelRoutingAttention(C, num_heads=HEADS, n_win=3, top_k=2, implementation="xla", rngs=nnx.Rngs(0))
    assert layer.region(6, 7) == (2, 2)  # 3 x 4 regions on the 6 x 7 map, the last column partial
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 7, C))
    w = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    graphdef, state = nnx.split(layer)
    params = _plain(state)

    def fast(p):
        return nnx.merge(graphdef, nnx.State(jax.tree.map(nnx.Param, p)))(x)

    def ref(p):
        return reference_layer(p, x, n_win=3, top_k=2)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda p: (lambda y: (jnp.sum(y * w), y))(f(p)), has_aux=True))

    (_, y_fast), g_fast = loss(fast)(params)
    (_, y_ref), g_ref = loss(ref)(params)
    assert_close(y_fast, y_ref)
    flat_fast, flat_ref = jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)
    assert len(flat_fast) == 6
    for (path, a), e in zip(flat_fast, flat_ref):
        assert float(jnp.abs(e).max()) > 0, path
        assert_close(a, e, name=jax.tree_util.keystr(path))


def test_bf16_forward_is_finite():
    layer = BiLevelRoutingAttention(C, num_heads=HEADS, n_win=2, top_k=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = jax.jit(lambda x: layer(x))(jnp.ones((1, 4, 4, C), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("kwargs,x_shape,error,match", [
    (dict(channels=8, num_heads=3), None, ValueError, r"channels \(8\) must be a multiple of num_heads \(3\)"),
    (dict(channels=8, lce_kernel_size=4), None, ValueError, "lce_kernel_size must be odd"),
    (dict(channels=8, n_win=0), None, ValueError, "n_win must be a positive int"),
    (dict(channels=8, num_heads=2), (1, 16, 8), ValueError, r"\[batch, height, width, 8\] \(NHWC\), got \[1, 16, 8\]"),
    (dict(channels=8, num_heads=2), (1, 4, 4, 6), ValueError, r"got \[1, 4, 4, 6\]"),
])
def test_bad_arguments_raise_naming_them(kwargs, x_shape, error, match):
    with pytest.raises(error, match=match):
        layer = BiLevelRoutingAttention(**kwargs, rngs=nnx.Rngs(0))
        layer(jnp.ones(x_shape))
