"""The package's layer rules (docs/architecture.md), read from every import statement, function-level ones
included, without importing anything. Each rule names a part of the package and what it may not import."""
from __future__ import annotations

import ast

from conftest import REPO

OURS = "pretrain"
EVERYTHING_BUT_ERRORS = tuple(f"pretrain.{m}" for m in (
    "cli", "config", "data", "dist", "engine", "evaluation", "export", "fs", "models", "quickstart", "rng", "tasks",
    "viz", "weights", "bench", "_compat"))

RULES = {
    # a leaf: `vit-pretrain config` must not import torch through us
    "pretrain/config": EVERYTHING_BUT_ERRORS,
    # the exported-file format every reader shares
    "pretrain/weights.py": EVERYTHING_BUT_ERRORS,
    "pretrain/fs.py": EVERYTHING_BUT_ERRORS,
    "pretrain/errors.py": EVERYTHING_BUT_ERRORS,
    # models and data know no engine, CLI, task or each other
    "pretrain/models": ("pretrain.data", "pretrain.tasks", "pretrain.engine", "pretrain.cli", "pretrain.export",
                        "pretrain.evaluation", "pretrain.viz", "pretrain.dist", "pretrain.quickstart", "pretrain.bench"),
    "pretrain/data": ("pretrain.models", "pretrain.tasks", "pretrain.engine", "pretrain.cli", "pretrain.export",
                      "pretrain.evaluation", "pretrain.viz", "pretrain.dist", "pretrain.quickstart", "pretrain.bench"),
    # tasks are handed their weights by the engine; they never call it
    "pretrain/tasks": ("pretrain.engine", "pretrain.export", "pretrain.evaluation", "pretrain.cli", "pretrain.data",
                       "pretrain.quickstart", "pretrain.bench", "pretrain.dist"),
    # the loops the engine runs know no engine
    "pretrain/evaluation/evaluate.py": ("pretrain.engine", "pretrain.export", "pretrain.cli", "pretrain.tasks"),
    "pretrain/evaluation/knn.py": ("pretrain.engine", "pretrain.export", "pretrain.cli", "pretrain.tasks"),
    "pretrain/viz/attention.py": ("pretrain.engine", "pretrain.export", "pretrain.cli", "pretrain.tasks"),
    "pretrain/viz/tensorboard.py": ("pretrain.engine", "pretrain.export", "pretrain.cli", "pretrain.tasks"),
    # training: no command after it (export, eval, visualize, report), no CLI
    "pretrain/engine": ("pretrain.cli", "pretrain.export", "pretrain.evaluation.command", "pretrain.viz.visualize",
                        "pretrain.viz.report", "pretrain.quickstart", "pretrain.bench"),
    "pretrain/dist": ("pretrain.engine", "pretrain.tasks", "pretrain.models", "pretrain.data", "pretrain.cli"),
    # commands: nothing imports the CLI
    "pretrain/export": ("pretrain.cli", "pretrain.quickstart"),
    "pretrain/viz": ("pretrain.cli", "pretrain.quickstart"),
    "pretrain/evaluation": ("pretrain.cli", "pretrain.quickstart"),
}
KNOWN: set[tuple[str, str]] = set()
"""Crossings that remain, each with its reason: the test fails on any new one, and on one that went away
(so this list only shrinks). None remains."""


def _imports(path, package: str | None = None) -> set[str]:
    """Every module `path` imports, absolute. `package`: the file's package (default: from its place in REPO)."""
    if package is None:
        package = ".".join(path.relative_to(REPO).parts[:-1])
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


def _files(part: str):
    """The files of a rule's part: a module, or a package (`pretrain/config` is either)."""
    path = REPO / part
    if path.suffix != ".py" and path.with_suffix(".py").is_file():
        path = path.with_suffix(".py")
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def _crossings() -> set[tuple[str, str]]:
    found = set()
    for part, banned in RULES.items():
        files = _files(part)
        assert files, part
        own = part.removesuffix(".py").replace("/", ".")  # a package's modules import each other freely
        for path in files:
            for module in _imports(path):
                if module == own or module.startswith(own + "."):
                    continue
                if any(module == b or module.startswith(b + ".") for b in banned):
                    found.add((str(path.relative_to(REPO)), module))
    # a `from pretrain.x import y` counts once, by its module
    return {(f, m) for f, m in found if not any(m.startswith(g + ".") for ff, g in found if ff == f and g != m)}


def test_layers_do_not_cross():
    found = _crossings()
    assert found == KNOWN, f"new: {sorted(found - KNOWN)}; gone (remove from KNOWN): {sorted(KNOWN - found)}"


def test_the_reader_sees_every_import_form(tmp_path):
    """Function-level, `from pretrain import x` and relative imports are all read (else the test above
    proves nothing)."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from pretrain import models\n    import pretrain.engine.trainer\n"
                    "    from ..tasks import mae\n")
    got = _imports(path, package="pretrain.data")
    assert {"pretrain.models", "pretrain.engine.trainer", "pretrain.tasks.mae"} <= got


def _timm_and_shim_lines(path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line, scope) of each timm or torchvision import and of each `pretrain._compat` import in `path`;
    scope is the enclosing function's name ('' at module level)."""
    timm, shim = [], []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level:
                names = [child.module or ""]
            if any(n.split(".")[0] in ("timm", "torchvision") for n in names):
                timm.append((child.lineno, scope))
            if "pretrain._compat" in names:
                shim.append((child.lineno, scope))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "")
    return timm, shim


def test_timm_is_imported_after_the_torchvision_shim():
    """torchvision, and timm with it, fail to import on a CPU-only torch unless `pretrain._compat` ran first
    (its docstring), and `import pretrain` does not run it (it stays light): every module that imports
    either imports the shim before, itself (at module level or earlier in the same function) or through
    its package's `__init__`."""
    exempt = {
        "pretrain/_compat.py": "the shim itself",
        # a leaf (it imports nothing of ours): its one timm import runs in build_timm, whose callers
        # (export, eval, visualize, quickstart) have imported the shim through engine or evaluation
        "pretrain/weights.py": "a leaf",
    }
    unshimmed = []
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        timm, shim = _timm_and_shim_lines(path)
        if not timm or rel in exempt:
            continue
        parts = path.relative_to(REPO).parts  # packages below `pretrain` (whose __init__ must stay light)
        packages = [REPO.joinpath(*parts[:n], "__init__.py") for n in range(2, len(parts))]
        if any(p != path and any(scope == "" for _, scope in _timm_and_shim_lines(p)[1]) for p in packages):
            continue
        for line, scope in timm:
            if not any(s_line < line and s_scope in ("", scope) for s_line, s_scope in shim):
                unshimmed.append(f"{rel}:{line}")
    assert not unshimmed, f"timm or torchvision imported before `import pretrain._compat`: {unshimmed}"



def _task_kind_reads(source: str) -> list[int]:
    """Lines of `source` that read a `.kind` attribute (`cfg.task.kind`, `x.kind == ...`) or name it as a string
    (`getattr(t, "kind")`)."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source))
            if (isinstance(node, ast.Attribute) and node.attr == "kind")
            or (isinstance(node, ast.Constant) and node.value == "kind"))


def test_the_engine_asks_the_task_and_never_branches_on_its_kind():
    """The engine learns what a Task needs from the Task interface (pretrain/tasks/__init__.py: `Task`): it
    reads no `task.kind` and imports no particular task's module. No exceptions."""
    task_modules = {f"pretrain.tasks.{p.stem}" for p in (REPO / "pretrain/tasks").glob("*.py") if p.stem != "__init__"}
    found = []
    for path in _files("pretrain/engine"):
        name = path.relative_to(REPO)
        found += [f"{name}:{line} reads .kind" for line in _task_kind_reads(path.read_text())]
        found += [f"{name} imports {m}" for m in sorted(_imports(path))
                  if any(m == t or m.startswith(t + ".") for t in task_modules)]
    assert not found, found


def test_the_kind_scan_sees_every_form():
    source = ("if cfg.task.kind == 'mae':\n    pass\nk = getattr(cfg.task, 'kind')\n"
              "def f(task):\n    return task.kind\n")
    assert _task_kind_reads(source) == [1, 3, 5]
