"""The package as a user installs it: a wheel that carries its configs and runs outside the
checkout, test tools only in the `dev` extra, private third-party names behind the compat modules.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from tsesnet.training.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tsesnet", "data_store", "sweeps")
# What only the tests use (the `dev` extra); never imported by the packages or platform/.
TEST_TOOLS = ("pytest", "_pytest", "pytest_timeout", "moto", "monai")
SHIPPED = {
    "paper.yaml",
    "recommended.yaml",
    "science.yaml",
    "small.yaml",
    "sweep.yaml",
    "sweep_tiny.yaml",
    "tiny.yaml",
}

# Run inside the installed wheel, from a folder outside the checkout: every shipped recipe loads
# through the same functions `tsesnet train`/`sweep`/`demo` use, from the installed package.
LOAD_CONFIGS = """
import sys
from pathlib import Path
import sweeps.space, tsesnet
from tsesnet.programs import demo
from tsesnet.training.config import CONFIG_DIR, load_config
assert Path(tsesnet.__file__).is_relative_to(Path(sys.prefix)), tsesnet.__file__
assert Path(demo.CONFIG).is_file(), demo.CONFIG
names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
for name in names:
    if name.startswith("sweep"):
        sweep = sweeps.space.load(CONFIG_DIR / name)
        load_config(sweep.train_config_path())
    else:
        load_config(CONFIG_DIR / name)
print(" ".join(names))
"""


def test_configs_are_package_data():
    """The recipes live in the package (`tsesnet/configs/`), and the wheel is told to ship them."""
    assert CONFIG_DIR == ROOT / "tsesnet" / "configs"
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} == SHIPPED
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs/*.yaml" in data["package-data"]["tsesnet"]
    # The old path still works for commands typed before the move: a link, not a second copy.
    old = ROOT / "platform" / "configs"
    assert old.is_symlink() and old.resolve() == CONFIG_DIR


def test_test_tools_are_dev_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(req: str) -> str:
        return req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()

    runtime = {name(r) for r in project["dependencies"]}
    dev = {name(r) for r in project["optional-dependencies"]["dev"]}
    assert not runtime & {"pytest", "pytest-timeout", "moto", "monai"}, runtime
    assert {"pytest", "pytest-timeout"} <= dev
    # The packages import no test tool; platform/ scripts (run from a dev install: the cluster
    # rehearsal serves moto's S3 API) import no pytest.
    found = []
    files = [(p, TEST_TOOLS) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    files += [(p, ("pytest", "_pytest")) for p in sorted((ROOT / "platform").glob("*.py"))]
    for path, banned in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {m}"
                for m in mods
                if m.split(".")[0] in banned
            ]
    assert found == []


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 300):
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, argv))}\n{out.stdout[-3000:]}{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, install it (not editable) into a fresh venv
    and run the CLI and a config load from a folder that is not the checkout.

    The fresh venv sees this environment's site-packages through a `.pth` line (so torch and Ray
    are not installed again, and nothing is downloaded); a path added that way has its own
    `.pth` files ignored, so the editable install of the checkout stays out of it.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("tsesnet_platform-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path, env).strip()  # fmt: skip
    Path(site, "shared_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the checkout's editable install is visible through the .pth line; the
    # wheel goes into the fresh venv beside it and nothing of this environment is touched.
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
          wheel], tmp_path, env)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tsesnet = str(venv / "bin" / "tsesnet")
    assert "usage: tsesnet demo" in _run([tsesnet, "demo", "--help"], elsewhere, env)
    assert "schedule.epochs" in _run([tsesnet, "config", "keys"], elsewhere, env)
    loaded = _run([python, "-c", LOAD_CONFIGS], elsewhere, env).split()
    assert set(loaded) == SHIPPED
    where = _run([python, "-c", "import tsesnet.training.config as c; print(c.CONFIG_DIR)"],
                 elsewhere, env).strip()  # fmt: skip
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
