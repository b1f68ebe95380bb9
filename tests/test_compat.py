"""The private third-party names the packages use (`data_store.compat`, `tsesnet.compat`) exist in
the installed Ray, Zarr and PyTorch, which are versions the project supports and pins.

Run on each supported version (CI's install, an image's lock): a release that drops or moves a
private name fails here, with the library, its version and the name, not in a user's run.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import data_store.compat
import tsesnet.compat
from data_store.compat import SUPPORTED, Private

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = [*data_store.compat.PRIVATE, *tsesnet.compat.PRIVATE]


def _installed(library: str) -> str:
    return importlib.metadata.version(library)


def _pins() -> dict[str, SpecifierSet]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r.specifier for r in map(Requirement, deps)}


@pytest.mark.parametrize("library", sorted(SUPPORTED))
def test_supported_versions_are_the_pinned_ones_and_installed(library):
    assert str(_pins()[library]) == str(SpecifierSet(SUPPORTED[library])), (
        f"pyproject.toml pins {library}{_pins()[library]} but data_store/compat.py says its "
        f"private names are checked on {library}{SUPPORTED[library]}: change both together"
    )
    installed = _installed(library)
    assert SpecifierSet(SUPPORTED[library]).contains(Version(installed)), (
        f"{library} {installed} is installed; the private names are checked on "
        f"{library}{SUPPORTED[library]} only"
    )


@pytest.mark.parametrize(
    "private", PRIVATE, ids=[f"{p.library}{_installed(p.library)}-{p.where}" for p in PRIVATE]
)
def test_private_name_exists(private: Private):
    try:
        private.load()
    except ImportError as exc:
        pytest.fail(f"{exc}: update {private.library}'s entry in the compat module", pytrace=False)


def test_a_missing_private_name_says_library_version_and_name():
    gone = Private("zarr", "zarr.core.sync", "no_such_name", "a test")
    with pytest.raises(ImportError) as err:
        gone.load()
    assert str(err.value) == (
        f"zarr {_installed('zarr')} has no zarr.core.sync.no_such_name (used for a test); "
        f"this project supports zarr{SUPPORTED['zarr']}"
    )
    with pytest.raises(ImportError, match=r"^ray .* has no ray\.train\.v2\._nowhere "):
        Private("ray", "ray.train.v2._nowhere", None, "a test").load()


def test_the_compat_modules_import_no_library():
    """Importing the compat modules imports none of the libraries (they load names on use)."""
    import subprocess

    code = (
        "import sys, data_store.compat, tsesnet.compat\n"
        "print(sorted(m for m in ('ray', 'zarr', 'torch', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
