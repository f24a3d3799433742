"""The nets package has no import cycle: the loop imports the callbacks, never the reverse."""
import ast
from pathlib import Path

import nets

NETS = Path(nets.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(NETS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nets_imports(path: Path, known: set[str]) -> set[str]:
    """Every ``nets`` module that ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from nets.callbacks import Checkpoint" imports nets.callbacks;
            # "from nets import train" imports nets.train
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in NETS.rglob("*.py")}
    return {name: _nets_imports(path, set(files)) - {name} for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_nets_modules():
    graph = _import_graph()
    assert "nets.callbacks.schedule" in graph["nets.train"]  # the loop imports its callbacks
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_callbacks_never_import_the_loop():
    graph = _import_graph()
    for name, deps in graph.items():
        if name.startswith("nets.callbacks"):
            assert "nets.train" not in deps, name
