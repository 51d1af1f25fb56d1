"""The house rules of CONTRIBUTING.md, checked: floors (import-linter), no cross-file private
imports, imports at the top of their module, and kernels that import without Flax."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
from importlinter.cli import lint_imports

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("attnjax", "pallas_kernels", "experiments", "tests")
OPTIONAL_MARK = "optional dependency"
"""An import inside a function is allowed only on a line that says why with this comment."""


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_module(node: ast.ImportFrom, path: pathlib.Path) -> str:
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    package = package if path.name == "__init__.py" else package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_import_linter_contracts_are_kept():
    """setup.cfg's contracts: the floors (every import points down), kernels import only
    primitives, the blocked engine and pallas_kernels, and no import cycles."""
    assert lint_imports(config_filename=str(ROOT / "setup.cfg")) == 0, "run `lint-imports setup.cfg` for details"


def test_no_private_name_is_imported_from_another_file():
    offenders = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = _imported_module(node, path)
                if module.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private or any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{alias.name}")
    assert not offenders, "\n".join(offenders)


def test_imports_sit_at_the_top_of_their_module():
    lines_of = {}
    offenders = []
    for path, tree in _sources():
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                lines = lines_of.setdefault(path, path.read_text().splitlines())
                if OPTIONAL_MARK not in lines[node.lineno - 1]:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"imports inside functions (mark '# {OPTIONAL_MARK}: ...' if one breaks an optional " \
                          f"dependency): {offenders}"


@pytest.mark.parametrize("package", ["pallas_kernels.flash", "pallas_kernels.block_sparse",
                                     "pallas_kernels.stick_breaking", "pallas_kernels.lightning"])
def test_kernels_import_without_flax(package):
    code = f"import sys; sys.modules['flax'] = None; import {package}; assert 'attnjax.nn' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
