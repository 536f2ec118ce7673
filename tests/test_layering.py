"""The package's layers (DESIGN.md): `engine` does not import `cli`, `tasks` do not import `engine`, `data`
does not import `models`. Read from every import statement, function-level ones included, without
importing anything."""
from __future__ import annotations

import ast

from conftest import REPO

RULES = [("engine", "pretrain.cli"), ("tasks", "pretrain.engine"), ("data", "pretrain.models")]
KNOWN = {
    # fine-tuning loads an exported file or a run folder, which engine/export.py consolidates from DeepSpeed
    ("pretrain/tasks/finetune.py", "pretrain.engine.export"),
    # the decoders' input size comes from the architecture's defaults (models.vit.resolve_arch)
    ("pretrain/data/stream.py", "pretrain.models.vit"),
}
"""Crossings that remain, each with its reason: the test fails on any new one, and on one that went away
(so this list only shrinks)."""


def _imports(path) -> set[str]:
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package up
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)  # `from pretrain import cli`
    return out


def test_layers_do_not_cross():
    found = set()
    for layer, banned in RULES:
        files = sorted((REPO / "pretrain" / layer).rglob("*.py"))
        assert files, layer
        for path in files:
            for module in _imports(path):
                if module == banned or module.startswith(banned + "."):
                    found.add((str(path.relative_to(REPO)), module))
    # a `from pretrain.x import y` counts once, by its module
    found = {(f, m) for f, m in found if not any(m.startswith(g + ".") for ff, g in found if ff == f and g != m)}
    assert found == KNOWN, f"new: {sorted(found - KNOWN)}; gone (remove from KNOWN): {sorted(KNOWN - found)}"
