"""The docs: a short README, a site that builds strictly, reference pages generated from the code.

The site is MkDocs with the Material theme (`docs/mkdocs.yml`, pages in `docs/pages/`); its shell
blocks run in `tests/test_readme.py`. Here, fast and without Ray: the generated reference pages
equal what `docs/gen_reference.py` writes from the code, `mkdocs build --strict` passes (and
fails on a broken link or anchor, shown on a planted one), and every link of README.md lands.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [str(MKDOCS), "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives `page` (Python-Markdown's toc slugs of the heading text)."""
    out, fence = set(), False
    for line in page.read_text().splitlines():
        fence = fence != line.startswith("```")
        m = None if fence else re.match(r"^#{1,6} (.+)$", line)
        if m:
            out.add(slugify(m.group(1).replace("`", ""), "-"))
    return out


def test_the_generated_reference_pages_are_the_codes():
    gen = _generator()
    for page, text in gen.pages().items():
        assert page.is_file(), f"{page} missing: run `make docs`"
        assert page.read_text() == text, f"{page.relative_to(ROOT)} is stale: run `make docs`"
    cli = gen.CLI_PAGE.read_text()
    for command in (
        "tsesnet ingest SRC STORE",
        "tsesnet predict --model URI",
        "tsesnet config keys",
    ):
        assert command in cli, command
    assert "`optim.lr`" in gen.KEYS_PAGE.read_text()


def test_the_site_builds_strictly(tmp_path):
    proc = _build(DOCS / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


@pytest.mark.parametrize(
    "planted, named",
    [
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](model.md#no-such-heading)", "no-such-heading"),
    ],
)
def test_a_broken_link_or_anchor_fails_the_build(tmp_path, planted, named):
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("site"))
    page = tmp_path / "docs" / "pages" / "explanation" / "recipe.md"
    page.write_text(page.read_text() + f"\n{planted}\n")
    proc = _build(tmp_path / "docs" / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-3000:]


def test_the_readme_is_short_and_its_links_land():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        assert file.is_file(), f"README.md links to {target}: no such file"
        if anchor:
            assert anchor in _anchors(file), f"README.md links to {target}: no such heading"
