"""docs/coming_from_jax_nn_and_flax.md, "Loading flax weights": the page's snippet, run as written,
copies a ``flax.nnx.MultiHeadAttention`` into ``attnjax.nn.MultiHeadAttention`` with equal outputs,
and the copied layer decodes like flax's cached decode."""

import pathlib
import re

import jax.numpy as jnp
import pytest
from flax import nnx

from attnjax.nn import MultiHeadAttention
from tests.helpers import assert_close

PAGE = (pathlib.Path(__file__).parents[2] / "docs" / "coming_from_jax_nn_and_flax.md").read_text()


@pytest.fixture(scope="module")
def snippet():
    """The namespace after running the page's "Loading flax weights" example."""
    code = re.search(r"## Loading flax weights\n.*?```python\n(.*?)```", PAGE, re.S).group(1)
    namespace = {}
    exec(compile(code, "coming_from_jax_nn_and_flax.md", "exec"), namespace)
    return namespace


def test_copied_layer_matches_flax(snippet):
    flax_layer, layer = snippet["flax_layer"], snippet["layer"]
    assert isinstance(layer, MultiHeadAttention) and isinstance(flax_layer, nnx.MultiHeadAttention)
    for name in ("query", "key", "value", "out"):  # the biases are not zeros, so copying them is tested
        assert float(jnp.abs(getattr(layer, name).bias[...]).max()) > 0.1, name
    assert_close(snippet["y"], snippet["y_flax"])


def test_copied_layer_decodes_like_flax(snippet):
    """flax's in-module cache (decode=True) and attnjax's explicit KVCache give the same steps and caches."""
    flax_layer, layer, x = snippet["flax_layer"], snippet["layer"], snippet["x"]
    B, T, d = x.shape
    flax_layer.init_cache((B, T, d))
    cache = layer.init_cache(B, T)
    step = nnx.jit(lambda layer, x_t, cache: layer.decode(x_t, cache))  # one compile for every step
    for t in range(T):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        assert_close(y_t, flax_layer(x[:, t:t + 1], decode=True), name=f"step {t}")
    assert_close(cache.k, flax_layer.cached_key[...], name="keys")
    assert_close(cache.v, flax_layer.cached_value[...], name="values")


def test_default_layer_refuses_flax_out_bias(snippet):
    """Without ``out_bias=True`` there is nowhere for flax's ``out.bias`` to go: nnx.update says so."""
    plain = MultiHeadAttention(16, 4, num_kv_heads=2, head_dim=8, qkv_bias=True, rngs=nnx.Rngs(2))
    with pytest.raises(ValueError, match="bias"):
        nnx.update(plain, nnx.state(snippet["flax_layer"], nnx.Param))
