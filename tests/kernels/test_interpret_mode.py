"""``implementation="pallas"`` on CPU runs the kernels in the Pallas interpreter and says so, once per
kernel and process (``pallas_kernels.common.interpret``); an explicit ``interpret=`` does not warn."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from pallas_kernels.common import interpret
from pallas_kernels.flash import flash_attention_pallas

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret mode is the CPU default only")

Q, K, V = (jnp.asarray(np.random.default_rng(i).standard_normal((1, 16, 2, 16)), jnp.float32) for i in range(3))


@pytest.fixture
def fresh(monkeypatch):
    """A process in which no kernel has warned yet."""
    monkeypatch.setattr(interpret, "_WARNED", set())


def test_pallas_on_cpu_warns_once_per_kernel(fresh):
    with pytest.warns(interpret.InterpretModeWarning, match="pallas_kernels.flash runs in Pallas interpret mode"):
        out = aj.attention(Q, K, V, mask=masks.Causal(), implementation="pallas")
    np.testing.assert_allclose(out, aj.attention(Q, K, V, mask=masks.Causal(), implementation="reference"),
                               rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpret.InterpretModeWarning)
        aj.attention(Q, K, V, implementation="pallas")
    with pytest.warns(interpret.InterpretModeWarning, match="pallas_kernels.stick_breaking"):
        aj.attention(Q, K, V, mechanism="stick_breaking", mask=masks.Causal(), implementation="pallas")


def test_explicit_interpret_does_not_warn(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpret.InterpretModeWarning)
        flash_attention_pallas(Q, K, V, interpret=True)
    assert not interpret.default_interpret(None, "gpu", "flash") and not interpret.default_interpret(False, "cpu", "x")
