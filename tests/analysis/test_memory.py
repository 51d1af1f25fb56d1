"""At 32k tokens the blockwise tools compile with temporary memory O(T·tile), far below one [T, S] map.

Compile only (XLA's memory analysis allocates nothing): the issue's "a 32k-token entropy run compiles
with temp memory O(T·tile)".
"""

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks
from attnjax.analysis import attention_entropy, sink_scores

B, T, H, D, BLOCK_Q = 1, 32768, 2, 16, 128


@pytest.mark.parametrize("tool", [attention_entropy, sink_scores], ids=["entropy", "sink_scores"])
def test_32k_tokens_compile_with_temp_memory_of_a_few_query_tiles(tool):
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    compiled = jax.jit(lambda q, k: tool(q, k, mask=masks.Causal(), block_q=BLOCK_Q)).lower(q, q).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense_map = B * H * T * T * 4
    tile = B * H * BLOCK_Q * T * 4  # one [B, H, block_q, S] float32 tile of logits
    assert temp < dense_map / 16, f"temp {temp / 2**20:.0f} MiB vs a {dense_map / 2**20:.0f} MiB map"
    assert temp < 8 * tile, f"temp {temp / 2**20:.0f} MiB is more than 8 query tiles of {tile / 2**20:.0f} MiB"
