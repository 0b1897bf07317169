"""The package's import graph runs one way: each layer imports only the layers below it, no two
modules import each other (directly or round a longer loop), and the deployment side (bundle/,
runtime/, stream/) imports without torch, as a robot with only `pip install adapt-deploy[cpu]`
runs it. Read from the source (every import statement, including those inside functions), so a
lazy import that runs upward fails here too."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapt_deploy"

# Lowest first. A module may import its own package and any package of a lower rank; the base
# modules (rank 0) are small shared pieces with no package of their own.
RANKS: dict[str, int] = {
    "__init__": 0,
    "errors": 0,
    "atomic": 0,
    "progress": 0,
    "signals": 0,
    "labels": 0,
    "channel": 0,
    "extras": 0,
    "registry": 0,
    "gradient_memory": 0,
    "run_plot": 0,
    "demo_reference": 0,
    "config": 1,
    "bundle": 2,
    "data": 3,
    "ops": 3,
    "models": 4,
    "adapt": 5,
    "engine": 6,
    "runtime": 7,
    "export": 8,
    "tta": 9,
    "stream": 10,
    "demo": 11,
    "doctor": 11,
    "cli": 12,
}
# The torch backend is the runtime's one part that is torch by nature: these modules are imported
# only when `--backend torch` is asked for (runtime/selection.py imports them lazily).
TORCH_BACKEND = {
    "adapt_deploy.runtime.torch_backend",
    "adapt_deploy.runtime.torch_inference",
    "adapt_deploy.runtime.cuda_graphs",
    "adapt_deploy.runtime.cuda_streams",
}
# What `adapt-deploy stream`, `verify` and `build-engine` import: none may need torch.
TORCH_FREE_PACKAGES = ("bundle", "runtime", "stream")
TORCH_FREE_EXCEPTIONS = TORCH_BACKEND | {"adapt_deploy.stream.demo"}  # demo exports a bundle


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def optional_imports(tree: ast.Module) -> set[int]:
    """Import statements inside `try: ... except ImportError` (or ModuleNotFoundError, or a bare
    Exception): an optional use that works without the module."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = {ast.unparse(h.type) if h.type else "" for h in node.handlers}
        if caught & {"ImportError", "ModuleNotFoundError", "Exception"}:
            optional |= {id(n) for s in node.body for n in ast.walk(s)}
    return optional


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, required) for every import statement of the file: required
    unless it sits inside a function and in an ImportError guard (see optional_imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    optional = optional_imports(tree)
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports the submodule when there is one
            known = modules()  # read once per test session (cached)
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                for alias in node.names
            ]
        else:
            continue
        required = id(node) in top_level or id(node) not in optional
        found += [(t, node.lineno, required) for t in targets]
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {t for t, _, _ in imports_of(name, path) if t in known and t != name}
        for name, path in known.items()
    }


def upward_imports() -> list[str]:
    wrong = []
    for name, path in modules().items():
        own = layer(name)
        for target, line, _ in imports_of(name, path):
            if not target.startswith("adapt_deploy"):
                continue
            other = layer(target)
            both_base = RANKS[own] == 0 == RANKS[other]
            if other != own and RANKS[other] >= RANKS[own] and not both_base:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_every_package_has_a_rank():
    assert {layer(name) for name in modules()} <= set(RANKS), "add new packages to RANKS"


def test_no_import_runs_upward():
    assert upward_imports() == []


def test_no_two_modules_import_each_other():
    # Packages import their own submodules from __init__; those edges are not loops of design.
    edges = graph()
    for name, targets in edges.items():
        if modules()[name].name == "__init__.py":
            edges[name] = {t for t in targets if not t.startswith(name + ".")}
    assert cycles(edges) == []


def test_the_checks_can_fail():
    """The rules flag what they exist to flag: a loop, and an upward import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert RANKS[layer("adapt_deploy.runtime.segmenter")] < RANKS[layer("adapt_deploy.export.x")]


def test_deployment_side_needs_no_torch():
    """bundle/, runtime/ and stream/ may use torch only where it is optional (a guarded
    import inside a function: torch's CUDA memory where cuda-python is absent, say)."""
    wrong = []
    for name, path in modules().items():
        if layer(name) not in TORCH_FREE_PACKAGES or name in TORCH_FREE_EXCEPTIONS:
            continue
        for target, line, required in imports_of(name, path):
            if target.split(".")[0] == "torch" and required:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert wrong == []


def test_deployment_side_imports_without_torch_installed():
    """Import every bundle/, runtime/ and stream/ module, and the CLI, in a fresh interpreter
    where `import torch` fails, as on a robot without PyTorch."""
    deployment = [
        name
        for name in modules()
        if layer(name) in TORCH_FREE_PACKAGES and name not in TORCH_FREE_EXCEPTIONS
    ]
    names = [*sorted(deployment), "adapt_deploy.cli"]
    script = (
        "import importlib, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx', 'onnxscript'):\n"
        "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(TORCH_BACKEND))
def test_torch_backend_modules_exist(name):
    """The exceptions above name real modules (a rename must update them)."""
    assert name in modules()
