"""`platform/rehearsal.py` for the tests: the same code a user runs with `rehearsal.sh up`.

`platform/` is not a package (it would shadow the standard library's `platform`), so the file
is loaded by path, and registered in `sys.modules` (its dataclasses need their module there).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NAME = "tsesnet_platform_rehearsal"


def load():
    """The `platform/rehearsal.py` module."""
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, ROOT / "platform" / "rehearsal.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]
