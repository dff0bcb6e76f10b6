"""The library's layering: apex_dist never imports the scripts under tools/ (apex_tools)."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "apex_dist"


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, at any depth (lazy imports too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def test_no_library_module_imports_the_tools():
    offenders = {
        str(path.relative_to(LIBRARY.parent)): sorted(
            module
            for module in imported_modules(path)
            if module.split(".")[0] in ("apex_tools", "tools")
        )
        for path in sorted(LIBRARY.rglob("*.py"))
    }
    offenders = {path: modules for path, modules in offenders.items() if modules}
    assert offenders == {}, f"apex_dist imports scripts of tools/: {offenders}"
    assert len(list(LIBRARY.rglob("*.py"))) > 20  # the walk found the library
