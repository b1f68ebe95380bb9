"""The architecture the README's "How the code is laid out" describes, checked on the code.

The import rules read every import statically: module-level and lazy (function-level) imports,
and `importlib.import_module("...")` / `__import__("...")` calls with a literal name.

- Imports point down the layers only (cli -> programs -> sweeps -> training/serving -> tracking
  -> common and data_store -> core), and no two modules import each other, directly or through
  others.
- The pure-PyTorch core (`CORE`) imports only the standard library and `CORE_THIRD_PARTY`; it
  also imports with ray, mlflow and zarr made unimportable.
- `data_store` never imports `tsesnet` or `sweeps`.
- A private third-party module or name (a `_` component, or a `PRIVATE_MODULES` path) is imported
  only by the compat modules (`COMPAT`), which list each one with the versions it is checked on.
- A dynamic import whose name is not a literal (so no rule can read it) only where `DYNAMIC` says.
- The process environment is written (`os.environ[...] =`, `setdefault`, `update`, `putenv`, ...)
  only by the modules in `ENVIRON_WRITES`, each with the reason.
- Below the command line, an error speaks of parameters, not of the command line's flags: no
  string in a `raise` names a `--flag` (the CLI maps parameter placeholders to its flags:
  `data_store.errors.InputError`), except in the command modules and handlers (`FLAGS_SPOKEN`), a
  quoted `tsesnet ...` command suggested, and the lines in `FLAGS_KEPT`.
- Each rule is shown failing on a violation planted in a small package tree (`PLANTS`).
- No function is longer than 80 lines (declarative tables excepted, by name, below).
- `platform/` stays a folder, not a package (it would shadow the standard library's module).
- The benchmarks and `platform/` scripts import only names the code still has.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
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
    "tsesnet.compat": 2,  # private third-party names; builds on data_store.compat
    "data_store": 1,
    # the pure-PyTorch core: tsesnet.model, losses, metrics, inference, postprocess, segment
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
    "tsesnet.segment",
)
# The third-party packages the core may import (besides the standard library).
CORE_THIRD_PARTY = ("torch", "numpy", "scipy")
# Never imported by data_store (it sits below them and is used without them).
ABOVE_DATA_STORE = ("tsesnet", "sweeps")
# The one place each package keeps the private third-party names it uses.
COMPAT = ("data_store.compat", "tsesnet.compat")
# Internal modules of a library whose names carry no leading underscore.
PRIVATE_MODULES = ("zarr.core",)
# Modules that may import a name computed at run time: the CLI's handler table, the compat loader.
DYNAMIC = ("tsesnet.cli", "data_store.compat")
DYNAMIC_CALLS = ("importlib.import_module", "import_module", "__import__", "importlib.__import__")
# Settings are resolved at the edge (the CLI) and passed down; below it, the process environment
# is written only where a child process that Ray's runtime_env cannot reach must inherit a value.
ENVIRON_WRITES = {
    "data_store.local_ray": "RAY_AUTH_MODE: Ray takes it only from the environment (it refuses it "
    "in _system_config), here and in the GCS and raylet it starts, which no runtime_env reaches; "
    "ray.init itself writes the same value when it is unset",
    "tsesnet.common.console": "the command line's console set-up (called by `tsesnet.cli.main` "
    "only, before Ray or MLflow start): log deduplication, Ray AIR's output and MLflow's logging "
    "and progress bars, Ray Train's print patch are read from the environment by Ray, MLflow "
    "and the local Ray's workers",
}
# Where a raised error may name a command-line flag: the command line itself (`cli` modules,
# the programs of `tsesnet/programs`, and each module's `cli*` handler functions).
FLAGS_SPOKEN = ("tsesnet.cli", "data_store.cli", "tsesnet.serving.predict_cli", "tsesnet.programs")
# (module, function) whose raised lines still name a flag, each with the reason.
FLAGS_KEPT = {
    ("tsesnet.serving.dicom_seg", "write_seg"): "a case's row in predict's summary.csv, written "
    "by the Ray actor into the run's record (`err.problem`), not a line the CLI renders; giving "
    "it the CLI's names would mean a field of PredictConfig, whose settings prediction.json "
    "records",
}
# A flag in an error's text: at the start, after a space or "(" or a backtick.
FLAG = re.compile(r"(^|[\s(`])--[a-z]")
# A command suggested in backticks (`tsesnet store verify STORE --deep`): its flags are that
# command's, whoever reads the line.
COMMAND = re.compile(r"`tsesnet [^`]*`")
ENVIRON_METHODS = ("setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__")
MAX_FUNCTION_LINES = 80
# Functions that are declarative tables (one entry per line), allowed to be longer.
DECLARATIVE: set[str] = set()


@dataclass(frozen=True)
class Import:
    """One import in a module: the absolute dotted name ("" when not a literal) and where."""

    target: str
    line: int
    how: str  # "import", "from", or the dynamic call's name


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            out[_module_name(root, path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import of `name` loads (a `from pkg import mod` names a module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_call_name(func.value)}.{func.attr}"
    return ""


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _file_imports(mod: str, path: Path) -> list[Import]:
    """Every import in one file, at any depth: statements and literal dynamic-import calls."""
    is_pkg = path.name == "__init__.py"
    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `base.name`: a module, or a name in `base` (`_resolve` then finds `base`)
            found += [Import(f"{base}.{a.name}", node.lineno, "from") for a in node.names]
        elif isinstance(node, ast.Call) and _call_name(node.func) in DYNAMIC_CALLS:
            how = _call_name(node.func)
            name = _literal(node.args[0]) if node.args else None
            if name and name.startswith("."):  # relative: resolvable only with a literal package
                package = _literal(node.args[1]) if len(node.args) > 1 else None
                name = importlib.util.resolve_name(name, package) if package else None
            found.append(Import(name or "", node.lineno, how))
    return found


@functools.cache
def _check(root: Path) -> dict[str, list[str]]:
    """Every import rule's violations in the tree at `root` (one line each), by rule."""
    known = _modules(root)
    found: dict[str, list[str]] = {
        r: []
        for r in (
            "cycles",
            "layers",
            "core",
            "data_store",
            "private",
            "dynamic",
            "environ",
            "flags",
        )
    }
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        where = f"{path.relative_to(root)}"
        own, rank = _layer(mod)
        graph[mod] = set()
        for imp in _file_imports(mod, path):
            says = f"{where}:{imp.line} {mod} -> {imp.target or '(a computed name)'} ({imp.how})"
            top = imp.target.split(".")[0]
            if not imp.target:
                if mod not in DYNAMIC:
                    found["dynamic"].append(says)
                continue
            if mod.split(".")[0] == "data_store" and top in ABOVE_DATA_STORE:
                found["data_store"].append(says)
            if top not in PACKAGES and top not in sys.stdlib_module_names:
                if _in(mod, CORE) and top not in CORE_THIRD_PARTY:
                    found["core"].append(says)
                private = any(p.startswith("_") for p in imp.target.split(".")[1:])
                if (private or _in(imp.target, PRIVATE_MODULES)) and mod not in COMPAT:
                    found["private"].append(says)
            target = _resolve(imp.target, known)
            if not target or target == mod or mod.startswith(target + "."):
                continue
            graph[mod].add(target)
            other, trank = _layer(target)
            if trank > rank or any({own, other} == set(pair) for pair in APART):
                found["layers"].append(says)
        if mod not in ENVIRON_WRITES:
            found["environ"] += [
                f"{where}:{line} {mod}: {what}" for line, what in _env_writes(path)
            ]
        if not _in(mod, FLAGS_SPOKEN):
            found["flags"] += [
                f"{where}:{line} {text!r}" for line, text in _flags_raised(mod, path)
            ]
    found["cycles"] = [" <-> ".join(c) for c in _cycles(graph)]
    return {rule: sorted(set(v)) for rule, v in found.items()}


def _env_writes(path: Path) -> list[tuple[int, str]]:
    """(line, what) of every write to the process environment in one file."""

    def is_environ(node: ast.expr) -> bool:
        return _call_name(node) in ("os.environ", "environ")

    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            out.append((node.lineno, "os.environ[...] written"))
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and is_environ(func.value):
                if func.attr in ENVIRON_METHODS:
                    out.append((node.lineno, f"os.environ.{func.attr}()"))
            elif _call_name(func) in ("os.putenv", "os.unsetenv", "putenv", "unsetenv"):
                out.append((node.lineno, f"{_call_name(func)}()"))
    return out


def _flags_raised(mod: str, path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string naming a `--flag` in a `raise` of one file, outside the
    command handlers (functions named `cli*`) and `FLAGS_KEPT`."""

    def text(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):  # an f-string: its text, each value as {}
            return "".join(text(v) or "{}" for v in node.values)
        return None

    def walk(node: ast.AST, func: str):
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            )
            if isinstance(child, ast.Raise) and child.exc is not None:
                yield child, inner
            yield from walk(child, inner)

    out = []
    for node, func in walk(ast.parse(path.read_text(), str(path)), ""):
        if func.startswith("cli") or (mod, func) in FLAGS_KEPT:
            continue
        pieces = {
            id(v) for j in ast.walk(node.exc) if isinstance(j, ast.JoinedStr) for v in j.values
        }
        for part in ast.walk(node.exc):
            whole = isinstance(part, ast.Constant | ast.JoinedStr) and id(part) not in pieces
            said = text(part) if whole else None
            if said is not None and FLAG.search(COMMAND.sub("", said)):
                out.append((node.lineno, said))
                break
    return out


def _in(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


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


RULES = {
    "cycles": "no two modules import each other, directly or through others",
    "layers": "imports point down the layers (and training and serving stay apart)",
    "core": f"the core imports the standard library and {', '.join(CORE_THIRD_PARTY)} only",
    "data_store": f"data_store imports none of {', '.join(ABOVE_DATA_STORE)}",
    "private": f"private third-party names only through {', '.join(COMPAT)}",
    "dynamic": f"imports of a computed name only in {', '.join(DYNAMIC)}",
    "environ": f"the process environment written only in {', '.join(ENVIRON_WRITES)}",
    "flags": "errors below the command line name parameters, not --flags (InputError placeholders)",
}


@pytest.mark.parametrize("rule", RULES)
def test_the_code_keeps_the_import_rule(rule):
    assert _check(ROOT)[rule] == [], RULES[rule]


def test_cycle_finder_finds_a_cycle():
    # the check above is only as good as this
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# A small tree shaped like the project's, keeping every rule, each import kind included.
CLEAN_TREE = {
    "tsesnet/__init__.py": "",
    "tsesnet/metrics.py": "import math\n\nimport numpy as np\nfrom scipy import ndimage\n",
    "tsesnet/losses.py": "import torch\n\nfrom tsesnet import metrics\n",
    "tsesnet/model/__init__.py": "from .net import Net\n",
    "tsesnet/model/net.py": "import torch\n\n\ndef f():\n    from ..metrics import math\n",
    "tsesnet/compat.py": "from data_store.compat import load\n",
    "tsesnet/training/__init__.py": "",
    "tsesnet/training/driver.py": (
        "import ray\n\nfrom data_store import store\nfrom tsesnet.losses import torch\n\n\n"
        "def run():\n    import mlflow\n\n    from tsesnet.compat import load\n"
    ),
    "tsesnet/cli.py": (
        "import importlib\n\n\ndef main(name):\n"
        "    importlib.import_module('tsesnet.training.driver')\n"
        "    return importlib.import_module(name)\n"
    ),
    "data_store/__init__.py": "",
    "data_store/store.py": "import numpy\nimport zarr\n\nfrom data_store import compat\n",
    "data_store/compat.py": (
        "import importlib\n\n\ndef load(name):\n    return importlib.import_module(name)\n\n\n"
        "def sync():\n    from zarr.core.sync import sync\n\n    return sync\n"
    ),
    "sweeps/__init__.py": "",
    "sweeps/runner.py": "from sweeps import space\nfrom tsesnet.training import driver\n",
    "sweeps/space.py": "import optuna\n",
}
# (rule it breaks, file, code appended to it): each breaks that rule and no other.
PLANTS = {
    "lazy mlflow in the core": ("core", "tsesnet/metrics.py", "def f():\n    import mlflow\n"),
    "ray in the core": ("core", "tsesnet/model/net.py", "from ray import train\n"),
    "zarr in the core via importlib": (
        "core", "tsesnet/losses.py", "import importlib\n\nimportlib.import_module('zarr')\n"
    ),
    "upward via importlib": (
        "layers", "tsesnet/losses.py",
        "import importlib\n\n\ndef f():\n    return importlib.import_module('sweeps.space')\n",
    ),
    "upward via __import__": ("layers", "tsesnet/model/net.py", "__import__('tsesnet.cli')\n"),
    "upward via from import_module": (
        "layers", "tsesnet/metrics.py",
        "from importlib import import_module\n\nimport_module('tsesnet.training')\n",
    ),
    "data_store imports tsesnet's core lazily": (
        "data_store", "data_store/store.py", "def g():\n    from tsesnet.metrics import np\n"
    ),
    "data_store imports the core via importlib": (
        "data_store", "data_store/store.py",
        "import importlib\n\nimportlib.import_module('tsesnet.losses')\n",
    ),
    "lazy cycle": ("cycles", "sweeps/space.py", "def h():\n    from sweeps import runner\n"),
    "private ray name": (
        "private", "tsesnet/training/driver.py", "from ray.train.v2._internal import constants\n"
    ),
    "private zarr module": ("private", "data_store/store.py", "from zarr.core.sync import sync\n"),
    "private name via importlib": (
        "private", "sweeps/runner.py",
        "import importlib\n\nimportlib.import_module('ray._raylet')\n",
    ),
    "an environment write below the CLI": (
        "environ", "tsesnet/model/net.py",
        "import os\n\n\ndef g():\n    os.environ.setdefault('RAY_X', '0')\n",
    ),
    "an environment item set in data_store": (
        "environ", "data_store/store.py", "from os import environ\n\nenviron['X'] = '1'\n"
    ),
    "putenv in sweeps": ("environ", "sweeps/space.py", "import os\n\nos.putenv('X', '1')\n"),
    "a flag in an error below the CLI": (
        "flags", "tsesnet/training/driver.py",
        "def claim(name):\n    raise ValueError(f'run {name} exists: choose another --name')\n",
    ),
    "a flag in a lock error's hint": (
        "flags", "data_store/store.py",
        "class Lock:\n    def take(self):\n"
        "        raise KeyError('held (pass --wait SECONDS to wait longer)')\n",
    ),
    "computed name in the core": (
        "dynamic", "tsesnet/metrics.py",
        "import importlib\n\n\ndef f(name):\n    return importlib.import_module(name)\n",
    ),
}  # fmt: skip


def _write_tree(root: Path, plant: tuple[str, str, str] | None = None) -> Path:
    for rel, text in CLEAN_TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if plant:
        _, rel, code = plant
        with open(root / rel, "a") as f:
            f.write("\n\n" + code)
    return root


def test_the_clean_tree_keeps_every_rule(tmp_path):
    assert _check(_write_tree(tmp_path)) == {rule: [] for rule in RULES}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_violation_breaks_its_rule_only(tmp_path, plant):
    rule, rel, _ = PLANTS[plant]
    found = _check(_write_tree(tmp_path, PLANTS[plant]))
    assert {r for r, lines in found.items() if lines} == {rule}, found
    if rule != "cycles":
        assert all(line.startswith(rel + ":") for line in found[rule]), found[rule]


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


def test_every_command_dispatches_to_a_handler_and_has_help(capsys):
    import importlib

    from tsesnet.cli import COMMANDS, HANDLERS, build_parser

    for command, target in HANDLERS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), command
        # Its arguments are declared beside it: in its module, or in its module's `_cli` sibling.
        arguments = COMMANDS[command].arguments.split(":")[0]
        assert arguments in (module, f"{module}_cli"), command
        helps = []
        for parser in (build_parser(), build_parser(only=command.split()[0])):
            with pytest.raises(SystemExit) as done:
                parser.parse_args([*command.split(), "--help"])
            assert done.value.code == 0, command
            helps.append(capsys.readouterr().out)
        assert helps[0] == helps[1] and "--help" in helps[0], command


def test_handlers_read_their_arguments_without_defaults_of_their_own():
    """A handler reads `args.x`: the default is the parser's, written once beside the handler,
    not a `getattr(args, "x", default)` that can disagree with it."""
    found = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) == 3
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "args"
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_help_of_one_command_imports_only_its_module():
    code = (
        "import sys\n"
        "from tsesnet.cli import build_parser\n"
        "build_parser(only='store')\n"
        "build_parser(only='')\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'tsesnet.training.driver') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


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
