"""The pre-norm MBConv shared by MOAT and MaxViT: parameter counts and arguments (its forward and gradients
are checked inside the MOAT and MaxViT references, tests/nn/conv/test_moat.py and tests/nn/vision/test_swin.py)."""

import pytest
from flax import nnx

from attnjax.nn.conv.mbconv import MBConv
from attnjax.testing.modules import parameter_count


@pytest.mark.parametrize("squeeze_excite", [False, True])
def test_parameter_count(squeeze_excite):
    C, E, k = 64, 256, 3
    S = C // 4
    expected = C + C * E + 2 * E + k * k * E + 2 * E + E * C + C + (E * S + S + S * E + E) * squeeze_excite
    model = nnx.eval_shape(lambda: MBConv(C, squeeze_excite=squeeze_excite, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="norm must be one of"):
        MBConv(8, norm="group", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expansion"):
        MBConv(8, expansion=0, rngs=nnx.Rngs(0))
