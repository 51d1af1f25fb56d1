"""Plots render to PNG with the promised labels; bad shapes name the argument."""

import numpy as np
import pytest

from attnjax.analysis.plots import new_axes, plot_attention_map, plot_head_heatmap, plot_rollout_on_image


def saved(ax, path):
    ax.figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    return path


def test_attention_map_with_token_labels(tmp_path):
    p = np.tril(np.ones((4, 6)), k=2)
    p /= p.sum(-1, keepdims=True)
    tokens = ["<s>", "the", "cat", "sat", "on", "mat"]
    ax = plot_attention_map(p, tokens, title="layer 0, head 1")
    saved(ax, tmp_path / "map.png")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("key", "query", "layer 0, head 1")
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens[2:]  # bottom-right aligned queries
    np.testing.assert_array_equal(ax.images[0].get_array(), p.astype(np.float32))
    with pytest.raises(ValueError, match="tokens.*S = 6"):
        plot_attention_map(p, tokens[:5])
    with pytest.raises(ValueError, match=r"probabilities.*\[2, 4, 6\]"):
        plot_attention_map(np.zeros((2, 4, 6)))


def test_head_heatmap_pads_layers_with_fewer_heads(tmp_path):
    ax = new_axes((4, 3))
    out = plot_head_heatmap([np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.5, 0.6])], "mean entropy", ax,
                            layer_labels=["a", "b"], value_label="nats", annotate=True)
    assert out is ax
    saved(ax, tmp_path / "heads.png")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("head", "layer", "mean entropy")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    grid = ax.images[0].get_array()
    assert grid.shape == (2, 4) and grid.mask[1, 2:].all() and not grid.mask[0].any()
    assert len(ax.texts) == 6
    with pytest.raises(ValueError, match="layer_labels"):
        plot_head_heatmap(np.ones((2, 3)), "x", layer_labels=["a"])
    with pytest.raises(ValueError, match="values"):
        plot_head_heatmap(np.ones(3), "x")


def test_rollout_overlay_on_an_image(tmp_path):
    row = np.arange(12, dtype=np.float32)
    image = np.linspace(0, 1, 48 * 64 * 3).reshape(48, 64, 3)
    ax = plot_rollout_on_image(row, (3, 4), image)
    saved(ax, tmp_path / "rollout.png")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("patch column", "patch row", "attention rollout")
    picture, overlay = ax.images
    assert picture.get_array().shape == (48, 64, 3) and overlay.get_extent() == [-0.5, 63.5, 47.5, -0.5]
    np.testing.assert_array_equal(overlay.get_array(), row.reshape(3, 4))
    assert overlay.get_alpha() == 0.5
    saved(plot_rollout_on_image(row, (3, 4)), tmp_path / "grid.png")
    with pytest.raises(ValueError, match=r"rollout_row must be \[h\*w\] = \[12\]"):
        plot_rollout_on_image(np.ones(13), (3, 4))
