"""The layering holds: flows -> tasks -> backends -> models, and models/ is pure."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_IN_MODELS = {"__future__", "typing", "dataclasses", "enum", "re", "ipaddress", "hashlib", "json", "copy",
                     "string", "pydantic", "yaml", "itertools", "functools", "collections", "math",
                     # pure time libraries (maintenance windows): no I/O beyond reading the tz database
                     "datetime", "zoneinfo", "bisect", "heapq", "posixpath", "dateutil", "icalendar", "recurring_ical_events"}
FORBIDDEN_CALLS = {"open", "exec", "eval", "__import__"}


def test_models_is_pure():
    for path in (ROOT / "models").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [] if node.level else [node.module or ""]
            else:
                mods = []
            for m in mods:
                assert m.split(".")[0] in ALLOWED_IN_MODELS, f"{path.name}:{node.lineno} imports {m}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {node.func.id}"


def test_import_linter_layers():
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _module_imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in the file (inside functions too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # ``from pkg import mod`` imports the module pkg.mod
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {n for n in names if n.split(".")[0] == package}
        graph[mod] = deps
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_not_even_inside_functions():
    """import-linter sees only what Python imports at load time; an import inside a function can hide a cycle."""
    for package in ("models", "backends"):
        graph = _module_imports(package)
        # a package's __init__ re-exporting its submodules is not a cycle of theirs
        graph = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
        cycle = _cycle(graph)
        assert cycle is None, f"import cycle in {package}/: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
