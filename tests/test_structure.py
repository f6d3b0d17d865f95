"""The shape of the `train` package: no import cycles between its modules, and no module longer
than 450 lines unless its docstring says why (a sentence starting with "Longer than").

Imports count wherever they are (inside functions too), except under `if TYPE_CHECKING:`.
`from train import x` counts as importing the module `train.x` when `x` is a submodule.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "train"
MAX_LINES = 450
WHY_LONGER = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)Longer than\b")


def module_files(package: Path) -> dict[str, Path]:
    """`train.x.y` -> its file, for every module of the package (packages by `__init__.py`)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, relative level, module, names imported from it) of every import outside `if TYPE_CHECKING:`."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, 0, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            found.append((node.lineno, node.level, node.module or "", names))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    modules = module_files(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, level, module, names in imported_names(tree):
            if level:  # relative: resolve against the importing module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (level - 1)]
                module = ".".join([*base, module] if module else base)
            if module != root and not module.startswith(root + "."):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if len(targets) < len(names) or not names:
                # Names that are not submodules come from the module itself (or its package).
                target = module
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                targets.append(target)
            for target in targets:
                if target != name and target in modules:
                    graph[name].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    found = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path back to `start` inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while True:
            previous = parents[path[-1]]
            if previous == start:
                break
            path.append(previous)
        found.append([start, *reversed(path[1:]), start])
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]], package: Path) -> str:
    modules = module_files(package)
    steps = [
        f"{modules[a].relative_to(package.parent)}:{graph[a][b]} imports {b}"
        for a, b in itertools.pairwise(cycle)
    ]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def long_files(package: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(path, lines) of the modules over `limit` lines whose docstring does not say why."""
    offenders = []
    for path in module_files(package).values():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines <= limit:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if not WHY_LONGER.search(docstring):
            offenders.append((str(path.relative_to(package.parent)), lines))
    return offenders


def test_no_import_cycles_in_train():
    graph = import_graph(PACKAGE)
    assert graph["train.__main__"], "the walker found no imports in train/__main__.py"
    found = cycles(graph)
    assert not found, "import cycles in train/:\n" + "\n".join(
        describe(c, graph, PACKAGE) for c in found
    )


def test_no_module_too_long_without_a_reason():
    offenders = long_files(PACKAGE)
    assert not offenders, (
        f"modules over {MAX_LINES} lines (split them, or say why in the module docstring with a "
        'sentence starting "Longer than"):\n'
        + "\n".join(f"  {path}: {lines} lines" for path, lines in offenders)
    )


# The checks themselves, on a small package written for them.


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "train"


def test_the_walker_finds_cycles_through_every_import_form(tmp_path: Path):
    package = write(
        tmp_path,
        {
            "train/__init__.py": "",
            "train/a.py": "def f():\n    from train import b\n",
            "train/b.py": "import train.sub.c\n",
            "train/sub/__init__.py": "from .c import g\n",
            "train/sub/c.py": "from ..a import f\n",
            "train/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import train.e\n",
            "train/e.py": "from train.d import x\n",
        },
    )
    graph = import_graph(package)
    assert graph["train.a"] == {"train.b": 2}
    assert graph["train.b"] == {"train.sub.c": 1}
    assert graph["train.sub"] == {"train.sub.c": 1}
    assert graph["train.sub.c"] == {"train.a": 1}
    assert graph["train.d"] == {}
    assert graph["train.e"] == {"train.d": 1}
    assert cycles(graph) == [["train.a", "train.b", "train.sub.c", "train.a"]]
    assert "train/sub/c.py:1 imports train.a" in describe(cycles(graph)[0], graph, package)


def test_long_modules_need_a_sentence_saying_why(tmp_path: Path):
    body = "x = 1\n" * 460
    package = write(
        tmp_path,
        {
            "train/__init__.py": "",
            "train/short.py": '"""Short."""\n' + "x = 1\n" * 10,
            "train/bare.py": '"""A module."""\n' + body,
            "train/why.py": '"""A module. Longer than 450 lines: one table."""\n' + body,
            "train/mention.py": '"""Not Longer than-ish: say it as a sentence"""\n' + body,
        },
    )
    assert sorted(long_files(package)) == [("train/bare.py", 461), ("train/mention.py", 461)]
