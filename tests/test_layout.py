"""The package's import rules: the fold core knows nothing of files, verification or the CLI."""

from __future__ import annotations

import ast
import pathlib

import bnfold

PKG = pathlib.Path(bnfold.__file__).parent

# subpackage -> the bnfold modules it must never import
FORBIDDEN = {
    "fold": ("bnfold.onnxio", "bnfold.verify", "bnfold.cli", "bnfold.jobs", "bnfold.api", "bnfold.report_json"),
    "onnxio": ("bnfold.fold", "bnfold.verify", "bnfold.cli", "bnfold.jobs", "bnfold.api"),
    "verify": ("bnfold.cli", "bnfold.jobs"),
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute bnfold.* imports"
            if node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_import_rules_hold() -> None:
    broken = []
    for sub, forbidden in FORBIDDEN.items():
        for path in sorted((PKG / sub).rglob("*.py")):
            for name in sorted(_imports(path)):
                if name.startswith(forbidden):
                    broken.append(f"{path.relative_to(PKG)} imports {name}")
    assert not broken, "\n".join(broken)


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(PKG))
        for p in sorted(PKG.rglob("*.py"))
        if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not missing, missing


def test_py_typed_ships() -> None:
    assert (PKG / "py.typed").is_file()
