"""The package's structure: imports flow one way through its layers, no circles, no method chosen by its name
outside the registry, and the installed package holds no repository tooling."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moco"

# Each part of the package and its layer: a module may import from its own part and from lower layers only.
LAYERS = {
    "errors": 0,
    "runtime": 1, "distributed": 1, "files": 1, "extras": 1,
    "config": 2,
    "model": 3, "data": 3,
    "checkpoints": 4,
    "train": 5,
    "evaluate": 6, "transfer": 6,
    "pipeline": 7,
    "cli": 8,
}


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package by its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports, at the top or inside functions}; `from .a import b` counts
    as an import of module a.b when that is a module, else of a."""
    known = modules()
    graph = {}
    for name, path in known.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parent = ".".join((base[: len(base) - node.level + 1] if node.level else []) + [node.module or ""])
                parent = parent.rstrip(".")
                targets |= {f"{parent}.{a.name}" if f"{parent}.{a.name}" in known else parent for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def part(module: str) -> str:
    return module.split(".")[1]


def test_imports_flow_down_the_layers():
    wrong = []
    for module, targets in imports().items():
        if module in ("moco", "moco.__main__"):
            continue  # the package's face and entry point sit above everything
        for target in targets:
            if target != "moco" and part(target) != part(module) and LAYERS[part(target)] >= LAYERS[part(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))
    assert set(LAYERS) == {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                           if p.name not in ("__init__.py", "__main__.py", "__pycache__")}


def test_no_import_circles():
    known = modules()
    faces = {m for m, p in known.items() if p.name == "__init__.py"}  # packages' faces only re-export
    graph = {m: ts - faces for m, ts in imports().items()}
    done: set[str] = set()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in graph[module]:
            visit(target, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not circles, circles


def test_no_method_is_chosen_by_its_name_outside_the_registry():
    pattern = re.compile(r"\b(method|mechanism)\b\s*(==|!=|in)\s*[\"'(]")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_import_moco_is_light_and_the_package_runs_no_repository_tooling():
    code = "import sys, moco, moco.cli; print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "subprocess" not in text and "git " not in text, path
