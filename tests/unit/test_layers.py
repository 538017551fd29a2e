"""The layering holds: flows -> tasks -> backends -> models, and models/ is pure."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_IN_MODELS = {"__future__", "typing", "dataclasses", "enum", "re", "ipaddress", "hashlib", "json", "copy",
                     "string", "pydantic", "yaml", "itertools", "functools", "collections", "math"}
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
