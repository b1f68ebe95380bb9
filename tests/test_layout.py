"""The project's fixed layout: `platform/` is a folder of files to run or read, never a package."""

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert (ROOT / "platform").is_dir()
    assert (ROOT / "platform" / "README.md").is_file()
    assert not list((ROOT / "platform").rglob("__init__.py"))


def test_stdlib_platform_still_works_under_pytest():
    assert platform.__file__ is not None and "site-packages" not in platform.__file__
    assert Path(platform.__file__).parent != ROOT / "platform"
    assert platform.system() in {"Linux", "Darwin", "Windows"}


def test_stdlib_platform_works_from_the_repo_root():
    # Running from the repository root puts it first on sys.path: the case that would break.
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}


def test_top_level_layout():
    for name in (
        "platform",
        "tsesnet",
        "data_store",
        "sweeps",
        "tests",
        "pyproject.toml",
        "README.md",
        "Makefile",
        ".ci/run",
        "docs/mkdocs.yml",
    ):
        assert (ROOT / name).exists(), name
    for pkg in ("tsesnet", "data_store", "sweeps"):
        assert (ROOT / pkg / "__init__.py").is_file()
