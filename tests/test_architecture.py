"""The architecture the README's "How the code is laid out" describes, checked on the code.

- Imports point down the layers only (cli -> programs -> sweeps -> training/serving -> tracking
  -> core, common and data_store), and no two modules import each other, directly or through
  others: a static import graph of every module, lazy function-level imports included.
- The pure-PyTorch core imports with ray, mlflow and zarr made unimportable.
- No function is longer than 80 lines (declarative tables excepted, by name, below).
- `platform/` stays a folder, not a package (it would shadow the standard library's module).
- The benchmarks and `platform/` scripts import only names the code still has.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tsesnet", "data_store", "sweeps")

# Lower number = lower layer. A module may import its own layer's modules (without cycles) and
# any lower layer's. Longest prefix wins.
LAYERS = {
    "tsesnet.cli": 7,
    "tsesnet.programs": 6,
    "sweeps": 5,
    "tsesnet.training": 4,
    "tsesnet.serving": 4,
    "tsesnet.registry": 3,  # a re-export of tsesnet.tracking.registry (the documented API)
    "tsesnet.tracking": 3,
    "tsesnet.common": 2,
    "data_store": 1,
    # the pure-PyTorch core: tsesnet.model, losses, metrics, inference, postprocess
    "tsesnet": 0,
}
# Same layer, but never each other: training does not serve and serving does not train.
APART = (("tsesnet.training", "tsesnet.serving"),)
CORE = (
    "tsesnet.model",
    "tsesnet.losses",
    "tsesnet.metrics",
    "tsesnet.inference",
    "tsesnet.postprocess",
)
MAX_FUNCTION_LINES = 80
# Functions that are declarative tables (one entry per line), allowed to be longer.
DECLARATIVE: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import of `name` loads (a `from pkg import mod` names a module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = mod.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = _resolve(name, known)
            if target and target != mod and not mod.startswith(target + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {mod: _imports(mod, path, known) for mod, path in known.items()}


def _layer(mod: str) -> tuple[str, int]:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    # the check above is only as good as this
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    wrong = []
    for mod, targets in _graph().items():
        own, rank = _layer(mod)
        for t in sorted(targets):
            other, trank = _layer(t)
            apart = any({own, other} == set(pair) for pair in APART)
            if trank > rank or apart:
                wrong.append(f"{mod} -> {t}")
    assert wrong == []


def test_core_imports_without_ray_mlflow_or_zarr():
    """Import every core module with ray, mlflow, zarr (and data_store) made unimportable."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow', 'zarr', 'data_store'):\n"
        "            raise ImportError(f'{name} is blocked for the core')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {CORE!r}:\n"
        "    importlib.import_module(m)\n"
        "import tsesnet.model, torch\n"
        "tsesnet.model.build_model('tiny')(torch.zeros(1, 3, 8, 16, 16))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_function_over_80_lines(pkg):
    long = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and node.name not in DECLARATIVE:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert long == []


def test_the_documented_python_api_imports():
    code = (
        "from tsesnet.model import build_model\n"
        "from tsesnet.losses import tsc_loss, total_loss\n"
        "from tsesnet.metrics import dice, hd95, sensitivity\n"
        "from tsesnet.registry import load_model\n"
        "from data_store.sampler import PatchSampler\n"
        "from data_store.store import open_store\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_command_dispatches_to_a_handler_and_has_help():
    import importlib

    from tsesnet.cli import HANDLERS, build_parser

    for command, target in HANDLERS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), command
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*command.split(), "--help"])
        assert done.value.code == 0, command


def _project_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import of the project's packages in one file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                out += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [
                (a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES
            ]
    return out


def test_benchmarks_and_platform_scripts_import_names_that_exist():
    """The benchmarks and `platform/` scripts run rarely (some for an hour), so a name moved in
    the code must not first fail there: every project import they make, lazy ones included,
    resolves to a module or a name in it."""
    import importlib

    missing = []
    files = sorted((ROOT / "tests" / "benchmarks").glob("*.py")) + sorted(
        (ROOT / "platform").glob("*.py")
    )
    for path in files:
        for module, name, line in _project_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                missing.append(f"{where}: import {module}: {exc}")
                continue
            if name is None or name == "*" or hasattr(mod, name):
                continue
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{where}: {module} has no {name}")
    assert not missing, "\n".join(missing)
