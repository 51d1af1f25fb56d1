"""The convnet attention study: its task data, that every registered image module fits the net, the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.registry import modules
from experiments import conv_attention
from experiments.lib import convnet

TASK = convnet.TaskConfig()


def plus_matches(image: np.ndarray, config: convnet.TaskConfig) -> list[tuple[int, int, int]]:
    """``(channel, top, left)`` of every 3×3 window inside one grid cell that is exactly the plus glyph."""
    plus, cell = np.asarray(convnet.GLYPHS[convnet.TARGET]), config.size // config.grid
    starts = [c * cell + o for c in range(config.grid) for o in range(cell - 2)]
    return [(ch, top, left) for ch in range(config.channels) for top in starts for left in starts
            if np.array_equal(image[top:top + 3, left:left + 3, ch], plus)]


def test_dataset_is_deterministic_balanced_and_labels_the_plus():
    n = 8 * 13
    images, labels = convnet.make_dataset(TASK, n, seed=(3, 1))
    assert images.shape == (n, 16, 16, 4) and images.dtype == np.float32 and labels.dtype == np.int32
    again = convnet.make_dataset(TASK, n, seed=(3, 1))
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert not np.array_equal(images, convnet.make_dataset(TASK, n, seed=(3, 2))[0])
    assert np.bincount(labels, minlength=TASK.num_classes).tolist() == [13] * TASK.num_classes
    assert np.bincount(convnet.make_dataset(TASK, 20, seed=0)[1], minlength=8).tolist() == [3] * 4 + [2] * 4

    clean_task = convnet.TaskConfig(noise=0.0)
    clean, clean_labels = convnet.make_dataset(clean_task, 64, seed=5)
    for image, label in zip(clean, clean_labels):
        (channel, _, left), = plus_matches(image, clean_task)  # exactly one plus, distractors are other glyphs
        assert channel == label % clean_task.channels
        assert (left + 1 >= clean_task.size // 2) == (label >= clean_task.channels)
        assert set(np.unique(image)) <= {0.0, 1.0}, "glyphs never overlap"


@pytest.mark.parametrize("name", [s.name for s in modules("image")])
def test_every_registered_image_module_fits_the_convnet(name):
    """Built at the study's widths and feature-map sizes, abstractly (no compile): a module the study can't
    take needs an entry in ``convnet.OVERRIDES``."""
    settings = convnet.ConvSettings()
    model = nnx.eval_shape(lambda: convnet.build_model(settings, name))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct(convnet.input_shape(settings.task, 2), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert logits.shape == (2, settings.task.num_classes)
    widths = [a.channels for a in model.attentions if hasattr(a, "channels")]
    assert widths in ([], list(settings.widths))


def test_unknown_module_and_missing_channel_argument_are_refused():
    with pytest.raises(SystemExit):
        conv_attention.parse_args(["--modules", "none,not_a_module"])
    spec = modules("image")[0]
    odd = type(spec)(name="odd", module=spec.module, kwargs={"dim": 16}, inputs=spec.inputs, kind="image",
                     paper=spec.paper)
    with pytest.raises(ValueError, match="OVERRIDES"):
        convnet.attention_kwargs(odd, 32)


def test_cli_smoke_writes_table_json_and_plot(tmp_path):
    summary = conv_attention.main(["--smoke", "--modules", "none,se", "--widths", "8", "--no-progress",
                                   "--out", str(tmp_path), "--name", "conv_test"])
    assert [s["module"] for s in summary] == ["none", "se"]
    none, se = summary
    assert se["params_added"] == se["params"] - none["params"] > 0 and none["params_added"] == 0
    assert none["flops_ratio"] == 1.0 and se["flops_ratio"] > 1.0 and none["flops"] > 0
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in summary)
    saved = json.loads((tmp_path / "conv_test.json").read_text())
    assert [r["module"] for r in saved["results"]] == ["none", "se"] and saved["args"]["smoke"]
    md = (tmp_path / "conv_test.md").read_text()
    assert "| se " in md and "added vs none" in md
    assert (tmp_path / "conv_test.png").stat().st_size > 0
