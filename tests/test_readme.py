"""The README's usage example runs, and its table of mechanisms matches the registry."""

import pathlib
import re

from attnjax import registry

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_readme_table_matches_registry():
    assert registry.markdown_table() in README, "regenerate the README table with attnjax.registry.markdown_table()"


def test_readme_usage_example_runs():
    example = re.search(r"## Usage\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 1024, 8, 64)
    assert namespace["y"].shape == (2, 128, 512) and namespace["y_t"].shape == (2, 1, 512)
