"""The package layout as docs/architecture.md draws it: import directions, no circles, light start-up.

The import graph is read from the source with ``ast`` (module-level *and* function-level imports,
so no circle can hide inside a function); the torch-free and side-effect-free claims are checked
by importing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "sectional_moe"

#: what each top-level part of sectional_moe may import (besides itself); docs/architecture.md
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "files": set(),
    "env": {"errors"},
    "secrets": {"files"},
    "device": {"errors"},
    "hardware": {"errors", "files"},
    "runs": {"errors", "files", "env", "secrets"},
    "resolvers": {"errors", "runs"},
    "models": {"errors"},
    "data": {"errors", "files"},
    "tracking": {"runs", "errors", "files", "env", "secrets"},
    "callbacks": {"models", "hardware", "runs", "tracking", "env", "errors", "device"},
    "training": {"models", "data", "callbacks", "runs", "tracking", "env", "errors", "device", "secrets", "files", "hardware"},
    "cluster": {"runs", "resolvers", "secrets", "errors", "env", "files"},
    "evaluation": {"models", "data", "runs", "device", "errors"},
    "theory": {"models", "errors"},
    "report": {"runs", "tracking", "models", "theory", "errors", "files", "secrets"},
    "studies": {"cluster", "training", "models", "runs", "hardware", "device", "resolvers", "errors", "files"},
    "bench": {"training", "callbacks", "models", "runs", "hardware", "device", "files", "errors", "report"},
    "launch": {"cluster"},
}
#: entry-point modules allowed one more part than their package (module -> parts)
ENTRY_POINT_EXCEPTIONS: dict[str, set[str]] = {
    "sectional_moe.theory.cli": {"report"},  # `theory isoflop <sweep dir | wandb:...>` reads runs as the report does
}
#: modules that must import without torch or Lightning (the Hydra plugin scan, --help, planning)
TORCH_FREE = (
    "sectional_moe.errors", "sectional_moe.files", "sectional_moe.env", "sectional_moe.secrets", "sectional_moe.device",
    "sectional_moe.resolvers", "sectional_moe.runs.layout", "sectional_moe.runs.identity", "sectional_moe.runs.status",
    "sectional_moe.tracking.wandb_ids", "sectional_moe.models", "sectional_moe.models.spec", "sectional_moe.models.flops",
    "sectional_moe.cluster.sweeps", "sectional_moe.cluster.launcher", "sectional_moe.cluster.sbatch",
    "sectional_moe.training.overrides", "sectional_moe.training.validate", "sectional_moe.training.startup",
    "sectional_moe.training.memory", "sectional_moe.runs.lock", "sectional_moe.training.optim",
    "sectional_moe.studies.catalog", "sectional_moe.theory", "sectional_moe.report.table",
    "hydra_plugins.sectional_moe_launcher",
)
MAX_TOP_LEVEL_MODULES = 9


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours that ``path`` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        # a submodule always loads its parent packages first; that is not an edge we draw
        graph[name] = {m for m in _imports(path, name, known) if not name.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sectional_moe" and len(parts) > 1 else None


def test_there_is_no_import_circle_anywhere():
    graph = _graph()
    assert len(graph) > 60  # the scan really saw the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    src = "def f():\n    from sectional_moe.runs import layout\n"
    tree_imports = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert tree_imports == {"sectional_moe.runs"}  # ast.walk reaches function bodies


def test_every_package_imports_only_what_the_architecture_allows():
    violations = []
    for module, targets in _graph().items():
        part = _part(module)
        if part is None:
            continue
        assert part in ALLOWED, f"{module}: part {part!r} is missing from ALLOWED and docs/architecture.md"
        for target in targets:
            other = _part(target)
            allowed = ALLOWED[part] | ENTRY_POINT_EXCEPTIONS.get(module, set())
            if other is not None and other != part and other not in allowed:
                violations.append(f"{module} -> {target}")
    assert violations == []


def test_architecture_doc_lists_every_part():
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [part for part in ALLOWED if f"`{part}" not in doc]
    assert missing == []


def test_at_most_about_eight_modules_sit_at_the_top_of_the_package():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert all(p.joinpath("__init__.py").is_file() for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")


def _run_python(code: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_torch_free_modules_import_without_torch_or_lightning():
    code = ("import importlib, json, sys\n"
            "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in ('torch', 'lightning', 'pytorch_lightning') if k in sys.modules)))")
    proc = _run_python(code, *TORCH_FREE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_importing_every_module_registers_nothing():
    code = ("import importlib, pkgutil, signal, sys\n"
            "from omegaconf import OmegaConf\n"
            "import sectional_moe\n"
            "handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}\n"
            "for m in pkgutil.walk_packages(sectional_moe.__path__, 'sectional_moe.'):\n"
            "    if not m.name.endswith('__main__') and m.name != 'sectional_moe.launch':\n"
            "        importlib.import_module(m.name)\n"
            "import hydra_plugins.sectional_moe_launcher\n"
            "from sectional_moe import resolvers\n"
            "before = [n for n in resolvers.RESOLVERS if OmegaConf.has_resolver(n)]\n"
            "same = all(signal.getsignal(s) == h for s, h in handlers.items())\n"
            "resolvers.register()\n"
            "after = [n for n in resolvers.RESOLVERS if OmegaConf.has_resolver(n)]\n"
            "print(before, same, len(after) == len(resolvers.RESOLVERS))")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[] True True"


@pytest.mark.parametrize("flag", ["--help", "--cfg job"])
def test_train_entry_point_answers_help_and_cfg_without_torch(flag):
    code = ("import runpy, sys\n"
            "sys.argv = ['train.py', *sys.argv[1:]]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('\\nRESULT', code, 'torch' in sys.modules, 'lightning' in sys.modules)")
    proc = _run_python(code, *flag.split())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] in ("RESULT 0 False False", "RESULT None False False")
    assert ("Configuration groups" in proc.stdout) if flag == "--help" else ("seed: 0" in proc.stdout)


def test_launch_alias_still_writes_sweep_lines():
    proc = subprocess.run([sys.executable, "-m", "sectional_moe.launch", "overrides", "experts=2,4"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["experts=2", "experts=4"]
