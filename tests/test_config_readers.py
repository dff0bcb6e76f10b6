"""Every config option is read by the code that it names, or it does not exist.

Walks every leaf of the schema (`model.kernels.fused`, `train.steps`, ...) and looks for a read
of it in the code that runs a training (apex_dist/ without config.py, whose validation does not
count, launcher/ and kernels/), in code, not in strings or comments: `kernels.fused`, or
`<name>.fused` where `<name>` was assigned from `...kernels` in the same file. A new option
without a reader fails here by name.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from apex_dist.config import Config

ROOT = Path(__file__).resolve().parents[1]
READER_FOLDERS = ("apex_dist", "launcher", "kernels")
NOT_READERS = {ROOT / "apex_dist" / "config.py"}


def leaves(cls: type = Config, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        path = (*prefix, item.name)
        if dataclasses.is_dataclass(hints[item.name]):
            found += leaves(hints[item.name], path)
        else:
            found.append(path)
    return found


@dataclasses.dataclass
class CodeFacts:
    """What one file's code (not its strings or comments) does with attributes: every dotted
    attribute chain it reads (`config.model.kernels.fused`) and every assignment of a dotted
    value to a dotted name (`self.options = config.apex`)."""

    chains: set[tuple[str, ...]]
    assignments: list[tuple[tuple[str, ...], tuple[str, ...]]]


def dotted(node: ast.AST) -> tuple[str, ...] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return None


def code_facts(text: str) -> CodeFacts:
    tree = ast.parse(text)
    chains, assignments = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (chain := dotted(node)) is not None:
            chains.add(chain)
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        source = dotted(value) if value is not None else None
        for target in targets:
            name = dotted(target)
            if source is not None and name is not None:
                assignments.append((name, source))
    return CodeFacts(chains, assignments)


def reader_sources() -> dict[Path, CodeFacts]:
    return {
        path: code_facts(path.read_text())
        for folder in READER_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path not in NOT_READERS
    }


def contains(chain: tuple[str, ...], part: tuple[str, ...]) -> bool:
    return any(chain[i : i + len(part)] == part for i in range(len(chain) - len(part) + 1))


def holders(section: str, facts: CodeFacts) -> set[tuple[str, ...]]:
    """Names that hold `section` in one file: the section's own name, `<section>_config`, and
    whatever is assigned from one of those (`self.options: ApexConfig = config.apex`, then
    `options = self.options`), to a fixed point."""
    names = {(section,), (f"{section}_config",)}
    while True:
        found = {
            target
            for target, source in facts.assignments
            if any(source[-len(name) :] == name for name in names)
        }
        if found <= names:
            return names
        names |= found


def is_read(path: tuple[str, ...], sources: dict[Path, CodeFacts]) -> bool:
    section, name = path[-2], path[-1]
    for facts in sources.values():
        for holder in holders(section, facts):
            if any(contains(chain, (*holder, name)) for chain in facts.chains):
                return True
    return False


def test_every_config_leaf_has_a_reader():
    sources = reader_sources()
    unread = [".".join(path) for path in leaves() if not is_read(path, sources)]
    assert not unread, (
        f"config options that no code reads: {unread}; read each where it takes effect, or "
        "remove it from apex_dist/config.py"
    )


def test_the_reader_check_finds_a_missing_reader():
    code = 'settings = config.model.kernels\nuse(settings.fused)\n"""model.lora.rank"""\n'
    sources = {Path("x.py"): code_facts(code)}
    assert is_read(("model", "kernels", "fused"), sources)
    assert not is_read(("model", "kernels", "compile_blocks"), sources)
    assert not is_read(("model", "lora", "fused"), sources)
    assert not is_read(("model", "lora", "rank"), sources)  # text in a string is no reader
    assert len(leaves()) > 50  # the walk reaches the nested sections
