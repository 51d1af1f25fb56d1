"""``attnjax.inference.layer_checks.check_decoding_layer``: which layers the inference caches can step."""

import functools

import pytest
from flax import nnx

from attnjax.inference.layer_checks import check_decoding_layer
from attnjax.nn import SlidingWindowAttention
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE


def test_softmax_layers_with_rope_pass_and_the_rest_are_refused_by_name():
    check_decoding_layer(MultiHeadAttention(16, 2, rope=RoPE(), rngs=nnx.Rngs(0)), "cache")
    with pytest.raises(TypeError, match="cache takes an attnjax.nn.MultiHeadAttention layer, got int"):
        check_decoding_layer(3, "cache")
    with pytest.raises(NotImplementedError, match="mechanism is 'sigmoid'"):
        check_decoding_layer(MultiHeadAttention(16, 2, mechanism="sigmoid", rngs=nnx.Rngs(0)), "cache")
    bias = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)
    with pytest.raises(NotImplementedError, match="position_bias rule"):
        check_decoding_layer(MultiHeadAttention(16, 2, position_bias=bias, rngs=nnx.Rngs(0)), "cache")
    with pytest.raises(NotImplementedError, match="SlidingWindowAttention overrides"):
        check_decoding_layer(SlidingWindowAttention(16, 2, window=4, rngs=nnx.Rngs(0)), "cache")
