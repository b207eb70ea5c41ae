"""The house's floors: imports point one way, so no module of dmgan imports one that imports it
back (directly or through others, at the top of a file or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files() -> dict[str, Path]:
    """dmgan's modules by dotted name; ``kernels/`` is installed as ``dmgan.kernels``."""
    files = {}
    for base, package in ((ROOT / "dmgan", "dmgan"), (ROOT / "kernels", "dmgan.kernels")):
        for path in base.rglob("*.py"):
            if base.name == "dmgan" and "kernels" in path.relative_to(base).parts:
                continue  # the symlink to kernels/
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The dmgan modules ``name`` imports anywhere in its file. A package's own submodules are left
    out: importing one runs the package's ``__init__`` first, which is no circle of ours."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_right():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert {"dmgan.checkpoint", "dmgan.models", "dmgan.pipeline"} <= graph["dmgan.convert"]
    assert "dmgan.kernels.memory_read" in graph["dmgan.kernels.backend"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_one_that_imports_it_back():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_on_disk_formats_are_the_lowest_floor():
    files = module_files()
    assert imports_of("dmgan.checkpoint", files["dmgan.checkpoint"], set(files)) == set()
