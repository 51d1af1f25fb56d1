"""Width vs depth study: the shapes keep the head count and head width fixed, and the CLI smoke run learns."""

import json

import pytest
from flax import nnx

from experiments import width_depth
from experiments.lib.model import LanguageModel, num_params
from tests.experiments.test_lm_bytes import source_tree  # noqa: F401  (the fixture)


def test_shapes_split_the_total_head_count_widest_first():
    assert width_depth.shapes(8) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert width_depth.shapes(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    with pytest.raises(ValueError, match="total_heads"):
        width_depth.shapes(0)


def test_every_shape_has_the_same_heads_of_the_same_width_and_wide_is_smaller():
    args = width_depth.parse_args(["--total-heads", "4", "--head-dim", "8", "--d-model", "16"])
    params = []
    for layers, heads in width_depth.shapes(4):
        model = nnx.eval_shape(lambda: LanguageModel(width_depth.model_config(args, layers, heads), rngs=nnx.Rngs(0)))
        attention = [block.attention for block in model.blocks]
        assert sum(a.num_heads for a in attention) == 4 and {a.head_dim for a in attention} == {8}
        params.append(num_params(model))
    assert params == sorted(params), "fewer layers, fewer MLPs: the wide model is the smallest (Brown et al.)"


@pytest.mark.slow  # two byte LMs compiled and trained (about 11 s of the default suite's budget)
def test_cli_smoke_writes_results_and_learns(source_tree, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    rows = width_depth.main(["--smoke", "--root", str(source_tree), "--valid-fraction", "0.3", "--no-progress",
                             "--out", str(out), "--name", "wd_test"])
    assert [r["shape"] for r in rows] == ["1 × 2", "2 × 1"]
    assert all(r["bpb"] < 7.0 for r in rows), "trained models beat the 8 bits of a uniform byte guess"
    assert rows[-1]["latency_vs_deepest"] == rows[-1]["step_vs_deepest"] == 1.0
    saved = json.loads((out / "wd_test.json").read_text())
    assert [r["layers"] for r in saved["results"]] == [1, 2]
    assert "| 1 × 2" in (out / "wd_test.md").read_text() and (out / "wd_test.png").stat().st_size > 0
