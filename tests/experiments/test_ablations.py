"""Deconstructing-attention ablations: the variants' math, parameter matching, what each mixes, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import ablations
from experiments.lib.model import ModelConfig, logits, num_params
from tests.experiments.test_lm_bytes import source_tree  # noqa: F401  (the fixture)
from tests.helpers import assert_close

CONFIG = ModelConfig(vocab_size=256, d_model=8, num_layers=2, num_heads=2, mlp_ratio=2)
T = 9


def model(variant, configuration="uniform", *, shape_only=False):
    def make():
        return ablations.DeconstructedLM(CONFIG, variant, configuration, max_len=T, fixed_tokens=np.arange(T),
                                         rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if shape_only else make()


def test_non_approximate_is_eq_18_running_average():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, T, 3, 4)) for i in range(3))
    out = ablations.non_approximate_attention(q, k, v)
    s = np.einsum("bthd,bthd->bth", q, k) / 2.0  # Eq. 7: 1ᵀ(Q ⊙ K)/√d_h, one score per key position
    expected = np.zeros(v.shape)
    for i in range(T):  # Eq. 18: o_i = Σ_{j≤i} e^{s_j} v_j / Σ_{j≤i} e^{s_j}
        w = np.exp(s[:, :i + 1] - s[:, :i + 1].max(1, keepdims=True))
        expected[:, i] = np.einsum("bjh,bjhd->bhd", w, v[:, :i + 1]) / w.sum(1)[..., None]
    assert_close(out, expected)

    def naive(q, k, v):
        e = jnp.exp(jnp.einsum("bthd,bthd->bth", q, k) / 2.0)[..., None]
        return jnp.cumsum(e * v, axis=1) / jnp.cumsum(e, axis=1)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * v), (0, 1, 2)))(q, k, v)

    for got, want in zip(grads(ablations.non_approximate_attention), grads(naive)):
        assert_close(got, want)


def test_configurations_place_the_variant_in_odd_layers():
    assert ablations.variant_layers(3, "uniform") == [True, True, True]
    assert ablations.variant_layers(4, "hybrid") == [True, False, True, False]
    with pytest.raises(ValueError, match="configuration"):
        ablations.variant_layers(2, "skip")


def test_parameter_counts_match_standard():
    standard = num_params(model("standard", shape_only=True))
    for variant in ablations.VARIANTS[1:]:
        n = num_params(model(variant, shape_only=True))
        assert n == standard if variant != "mlp" else abs(n - standard) / standard < 0.01, variant


@pytest.mark.parametrize("variant", [v if v in ("mlp", "non_approximate", "rnd_emb_qk") else
                                     pytest.param(v, marks=pytest.mark.slow) for v in ablations.VARIANTS])
def test_each_variant_is_causal_and_mixes_what_it_should(variant):
    """Rows 0/1 of the batch differ at position 4, rows 2/3 at position 0 of row 3 only (batch independence)."""
    tokens = jax.random.randint(jax.random.key(0), (1, T), 0, 256)
    tokens = jnp.concatenate([tokens, tokens.at[0, 4].add(1) % 256, tokens, tokens.at[0, 0].add(1) % 256])
    out = np.asarray(logits(model(variant), tokens))
    assert out.shape == (4, T, 256) and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, :4], out[1, :4], err_msg=f"{variant}: position 4 reaches earlier ones")
    assert_close(out[0], out[2])  # row 3's change does not reach row 2: the fixed stream is shared, not mixed
    later = np.abs(out[0, 5:] - out[1, 5:]).max()
    if variant == "mlp":
        assert later == 0, "the MLP variant mixes no tokens"
    else:
        assert later > 0, f"{variant}: position 4 must reach later positions"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="variant"):
        model("cosine")
    with pytest.raises(ValueError, match="fixed_tokens"):
        ablations.DeconstructedLM(CONFIG, "fixed_seq_qk", "uniform", max_len=T, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model("rnd_emb_qk")(jnp.zeros((1, T + 1), jnp.int32))


@pytest.mark.slow  # two byte LMs compiled and trained (about 11 s of the default suite's budget)
def test_cli_smoke_writes_table_and_learns(source_tree, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    rows = ablations.main(["--smoke", "--root", str(source_tree), "--valid-fraction", "0.3", "--no-progress",
                           "--out", str(out), "--name", "abl_test"])
    assert [r["variant"] for r in rows] == ["standard", "rnd_emb_qk"]
    assert rows[0]["bpb_vs_standard"] == 1.0 and rows[0]["bpb"] < 7.0, "standard learns past a uniform 8 bits"
    saved = json.loads((out / "abl_test.json").read_text())
    assert len(saved["results"]) == 2 and (out / "abl_test.png").stat().st_size > 0
    assert "| rnd_emb_qk" in (out / "abl_test.md").read_text()
