"""The package's layout rules, read from the source: no import cycles, dependencies one way,
modules of one job and a readable length.

Imports are read with `ast` from every `import` / `from ... import` statement, deferred ones
(inside functions) included, since they run too; imports under `if TYPE_CHECKING:` do not run
and are left out. A rule on a package (tasks import nothing run-level) holds for everything its
modules reach, not only what they name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "bigmodel"
MAX_LINES = 450

# what each package may not reach, directly or through other bigmodel modules
FORBIDDEN = {
    "bigmodel.tasks": (
        "bigmodel.run",
        "bigmodel.loggers",
        "bigmodel.sweep",
        "bigmodel.callbacks",
        "bigmodel.cli",
        "bigmodel.checkpoints",
        "bigmodel.launcher",
        # tasks know nets through tasks/protocols.py only: any family fits, none is named
        "bigmodel.nets",
    ),
    "bigmodel.nets": ("lightning", "bigmodel.tasks", "bigmodel.data"),
    # decoding is below nets and deploy: both use it
    "bigmodel.sampling": ("lightning", "bigmodel.nets", "bigmodel.deploy", "bigmodel.tasks"),
    "bigmodel.data": ("bigmodel.nets", "bigmodel.tasks"),
}


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package by dotted name (`bigmodel.tasks` is tasks/__init__.py)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _statements(tree: ast.AST):
    """Import statements anywhere in `tree`, except under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules `name` imports: bigmodel modules by full name, others by top-level name.

    `from bigmodel.data import text` names the module bigmodel.data.text; `from bigmodel.data
    import TextData` names the package bigmodel.data.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _statements(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                # `import bigmodel.a.b` with no such module: the nearest one that exists
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    out.add(target)
            else:
                out.add(target.partition(".")[0])
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(src)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's modules (a list that ends where it starts), or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in done or node not in graph:
            return None
        stack.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, stack)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Everything `start` imports, directly or through the package's modules, each with the
    chain of imports that gets there."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return paths


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    """The import chains by which modules of `package` reach what they may not, one per
    offending import (the shortest chain that ends with it)."""
    forbidden = FORBIDDEN[package]
    found: dict[tuple[str, str], list[str]] = {}
    for module in sorted(m for m in graph if _within(m, package)):
        for target, chain in reach(graph, module).items():
            if not any(_within(target, f) for f in forbidden):
                continue
            if any(_within(c, f) for c in chain[1:-1] for f in forbidden):
                continue  # reached through something forbidden itself: that one is reported
            edge = (chain[-2], chain[-1])
            if edge not in found or len(chain) < len(found[edge]):
                found[edge] = chain
    return [" -> ".join(chain) for _, chain in sorted(found.items())]


def long_modules(src: Path = SRC) -> list[str]:
    """Modules over MAX_LINES lines whose docstring's first paragraph does not say why
    (the word "long")."""
    out = []
    for name, path in module_files(src).items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "long" not in doc.split("\n\n")[0].lower():
            out.append(f"{name}: {lines} lines")
    return out


def test_no_import_cycle():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", FORBIDDEN)
def test_dependencies_run_one_way(package):
    """tasks import nothing run-level and no net; nets know no Lightning, tasks or data; data no
    models; sampling no nets or deploy."""
    bad = layering_violations(import_graph(SRC), package)
    assert not bad, f"{package} reaches what it may not:\n" + "\n".join(bad)


def test_modules_are_short():
    bad = long_modules(SRC)
    assert not bad, (
        f"modules over {MAX_LINES} lines (split them, or say in the docstring's first paragraph "
        "why the module is long):\n" + "\n".join(bad)
    )
