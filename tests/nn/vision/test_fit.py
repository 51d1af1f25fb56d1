"""FIT modules against a plain reference of the official ``FIT.call`` stage (Chen & Li 2023, sec. 2): every
attention written as one dense masked softmax over all tokens of its stage, the masks built here from group ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.fit import FITBlock, FITCrossAttention, FITLayer
from attnjax.testing.modules import parameter_count
from tests.helpers import assert_close


def layer_norm(p, x):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def linear(p, x):
    y = jnp.einsum("btc,cd->btd", x, p["kernel"], precision="highest")
    return y + p["bias"] if "bias" in p else y


def masked_mha(p, h_query, h_source, heads, mask):
    """Multi-head softmax attention of every query over every source token, ``mask [T, S]`` applied densely."""
    B, T, _ = h_query.shape
    q = linear(p["query"], h_query).reshape(B, T, heads, -1)
    k = linear(p["key"], h_source).reshape(B, h_source.shape[1], heads, -1)
    v = linear(p["value"], h_source).reshape(B, h_source.shape[1], heads, -1)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return linear(p["out"], jnp.einsum("bhts,bshd->bthd", weights, v, precision="highest").reshape(B, T, -1))


def group_ids(tokens, groups):
    return np.repeat(np.arange(groups), tokens // groups)


def block_mask(queries, keys, groups):
    return group_ids(queries, groups)[:, None] == group_ids(keys, groups)[None, :]


def transformer_layer(p, x, heads, mask):
    h = layer_norm(p["attention_norm"], x)
    x = x + masked_mha(p, h, h, heads, mask)
    return x + linear(p["mlp_out"], jax.nn.gelu(linear(p["mlp_in"], layer_norm(p["mlp_norm"], x)), approximate=False))


def cross_attention(p, x, source, heads, mask):
    return x + masked_mha(p, layer_norm(p["query_norm"], x), layer_norm(p["source_norm"], source), heads, mask)


def fit_block_reference(p, x, latents, groups=3, data_heads=2, latent_heads=2):
    """Local layers (block-diagonal mask), data -> latent, global layers (no mask), latent -> data."""
    N, L = x.shape[1], latents.shape[1]
    for layer in p["local_layers"].values():
        x = transformer_layer(layer, x, data_heads, block_mask(N, N, groups))
    latents = cross_attention(p["data_to_latent"], latents, x, min(data_heads, latent_heads), block_mask(L, N, groups))
    for layer in p["global_layers"].values():
        latents = transformer_layer(layer, latents, latent_heads, np.ones((L, L), bool))
    x = cross_attention(p["latent_to_data"], x, latents, min(data_heads, latent_heads), block_mask(N, L, groups))
    return x, latents


def tokens(seed=0, N=12, L=6, Cx=16, Cl=8, dtype=jnp.float32):
    kx, kl = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (2, N, Cx), dtype), jax.random.normal(kl, (2, L, Cl), dtype)


@pytest.mark.slow  # run with --runslow; keeps the default suite under 20 minutes on 2 cores
def test_fit_block_equals_dense_masked_stages_forward_and_gradients():
    """3 groups of 4 data tokens and 2 latents, widths 16 and 8: ``check_module_against_reference``'s checks for the
    block's two outputs. Both outputs, then the gradients of every parameter (of the block's FITLayers and
    FITCrossAttentions) and of both inputs."""
    block = FITBlock(16, 8, 3, data_heads=2, latent_heads=4, local_layers=1, global_layers=1, rngs=nnx.Rngs(0))
    x, latents = tokens()
    graphdef, state = nnx.split(block, nnx.Param)
    w_x, w_l = (jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate((x, latents)))

    def module(p, x, latents):
        params = nnx.State(state)
        nnx.replace_by_pure_dict(params, p)
        return nnx.merge(graphdef, params)(x, latents)

    def reference(p, x, latents):
        return fit_block_reference(p, x, latents, latent_heads=4)

    def gradients(fn):
        def loss(*args):
            y, new_latents = fn(*args)
            return jnp.sum(y * w_x) + jnp.sum(new_latents * w_l)

        return jax.grad(loss, argnums=(0, 1, 2))

    p = nnx.to_pure_dict(state)
    (y, new_latents), (y_ref, latents_ref) = jax.jit(lambda *a: (module(*a), reference(*a)))(p, x, latents)
    assert_close(y, y_ref, rtol=2e-5, name="data tokens")
    assert_close(new_latents, latents_ref, rtol=2e-5, name="latents")
    grads, grads_ref = jax.jit(lambda *a: (gradients(module)(*a), gradients(reference)(*a)))(p, x, latents)
    flat, flat_ref = (jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads, grads_ref))
    assert [path for path, _ in flat] == [path for path, _ in flat_ref]
    assert len(flat) == len(jax.tree.leaves(p)) + 2  # every parameter, x and latents
    for (path, g), (_, g_ref) in zip(flat, flat_ref):
        assert_close(g, g_ref, rtol=2e-5, name=f"d{jax.tree_util.keystr(path)}")


def layer_count(C, r=4):
    return 4 * C * C + 2 * r * C * C + 8 * C + r * C


def cross_count(Cq, Cs, A):
    return 2 * Cq + 2 * Cs + (Cq + 2 * Cs) * A + 2 * A + A * Cq + Cq


def abstract(build):
    return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def test_parameter_counts():
    assert parameter_count(abstract(lambda r: FITLayer(16, 2, rngs=r))) == layer_count(16)
    assert parameter_count(abstract(lambda r: FITCrossAttention(8, 16, 2, rngs=r))) == cross_count(8, 16, 8)
    block = abstract(lambda r: FITBlock(32, 16, 4, data_heads=4, latent_heads=2, rngs=r))  # 2 local, 4 global
    assert parameter_count(block) == 2 * layer_count(32) + 4 * layer_count(16) + cross_count(16, 32, 16) \
        + cross_count(32, 16, 16)


def test_bad_inputs_name_the_argument():
    block = FITBlock(16, 8, 3, data_heads=2, latent_heads=2, local_layers=1, global_layers=1, rngs=nnx.Rngs(0))
    x, latents = tokens()
    with pytest.raises(ValueError, match="x has 10 tokens, not a multiple of num_groups=3"):
        block(x[:, :10], latents)
    with pytest.raises(ValueError, match="latents has 5 tokens, not a multiple of num_groups=3"):
        block(x, latents[:, :5])
    with pytest.raises(ValueError, match=r"latents must have shape \[batch, seq, 8\]"):
        block(x, x)
    with pytest.raises(ValueError, match="dim \\(16\\) must be a multiple of num_heads \\(3\\)"):
        FITLayer(16, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_dim \\(8\\) must be a multiple of num_heads \\(3\\)"):
        FITCrossAttention(8, 16, 3, rngs=nnx.Rngs(0))
