"""The architecture, checked from the source: which package may import which, no cycles, short
functions, no import-time side effects, and a reason on every linter exception.

    owners/        the data owner's side (keys, cipher, owner-agent)  -> protocol, mlcore, models
    orchestrator/  the cloud side                                     -> protocol, mlcore, models
    mlcore/        the ML core in plain PyTorch                        -> protocol, models
    models/        timm networks and key-aware variants                -> (nothing of ours)
    protocol/      the wire both sides share                           -> (nothing of ours)
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("owners", "orchestrator", "mlcore", "models", "protocol")
ALLOWED = {  # package -> the product packages it may import (besides itself)
    "owners": {"protocol", "mlcore", "models"},
    "orchestrator": {"protocol", "mlcore", "models"},
    "mlcore": {"protocol", "models"},
    "models": set(),
    "protocol": set(),
}
MAX_FUNCTION_LINES = 50
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")


def product_files() -> dict[str, Path]:
    """module name -> file, for every hand-written module of the product packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if GENERATED.search(path.name):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """Product modules ``module`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from pkg import module` or `import pkg.module.attr`
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = product_files()
    return {m: imported_modules(m, p, set(files)) for m, p in files.items()}


def test_each_side_imports_only_what_it_may():
    wrong = []
    for module, targets in import_graph().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_owners_never_import_the_cloud_and_the_cloud_never_imports_owners():
    graph = import_graph()
    for module, targets in graph.items():
        side = module.split(".")[0]
        if side in ("owners", "orchestrator"):
            forbidden = "orchestrator" if side == "owners" else "owners"
            assert not [t for t in targets if t.split(".")[0] == forbidden], f"{module} imports {forbidden}"


def test_no_import_cycle_in_the_product():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_a_cycle_and_a_forbidden_import(tmp_path):
    """The checks above can fail: the walker resolves both import forms to product modules."""
    (tmp_path / "a.py").write_text("from owners import keys\nimport orchestrator.store\n")
    found = imported_modules("protocol.a", tmp_path / "a.py", {"owners", "owners.keys", "orchestrator",
                                                                 "orchestrator.store"})
    assert found == {"owners", "owners.keys", "orchestrator.store"}


@pytest.mark.parametrize("module", sorted(product_files()))
def test_functions_fit_on_one_screen(module):
    path = product_files()[module]
    tree = ast.parse(path.read_text(), str(path))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: longer than {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("module", sorted(product_files()))
def test_importing_a_module_changes_nothing_outside_it(module):
    """No top-level calls (process-wide warning filters, environment variables, logging setup):
    only definitions, constants and imports run at import time."""
    path = product_files()[module]
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            pytest.fail(f"{path}:{node.lineno}: a call at import time")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, (ast.Subscript, ast.Attribute)):
                    pytest.fail(f"{path}:{node.lineno}: assigns into another object at import time")


def test_every_noqa_says_why():
    bare = []
    for folder in (*PACKAGES, "tests", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if GENERATED.search(path.name):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = re.search(r"#\s*noqa\b(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?(.*)", line)
                if match and len(match.group(3).strip(" -:")) < 3:
                    bare.append(f"{path.relative_to(ROOT)}:{number}")
    assert not bare, "noqa without a reason: " + ", ".join(bare)


def test_docs_and_comments_point_only_inside_the_repository():
    # The benchmarks' documented default data folder (the sibling shared/data/ folder) is the one
    # allowed exception. The names are built from parts so that this file does not itself contain them.
    design = "DESIGN"
    outside = re.compile(r"\.\./shared(?!/data)|" + design + r"\.md|" + design + " section")
    hits = []
    for path in [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("docs/*.md"), *ROOT.glob("deploy/**/*"),
                 *[p for f in (*PACKAGES, "tests", "benchmarks", "scripts") for p in (ROOT / f).rglob("*.py")]]:
        if path.is_file():
            hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                     if outside.search(line)]
    assert not hits, "references to documents outside the repository: " + ", ".join(hits)
