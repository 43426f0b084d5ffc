"""The documentation cannot rot unseen: the site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``,
so a broken link, anchor or API reference fails the suite; the README stays short, keeps its quick start,
and its links into docs/ land on pages and headings that exist."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import ROOT
from tests.conftest import REQUIRE_ALL

README = ROOT / "README.md"
README_MOST_LINES = 200
# The quick start: CI (.ci/run) runs the second command's test run; both must stay as written.
QUICK_START = (
    "bash scripts/setup.sh && .venv/bin/alexnet train --backend pt --epochs 1 --limit-train 2048",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q",
)
SITE_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")  # the `test` extra


def missing_site_packages() -> list[str]:
    missing = []
    for name in SITE_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is absent
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once with ``mkdocs build --strict`` (offline: no plugin fetches anything)."""
    missing = missing_site_packages()
    if missing:
        reason = f"mkdocs not installed ({', '.join(missing)}): pip install -e '.[test]'"
        if REQUIRE_ALL:  # CI installs the test extra: a missing site builder is a failure there
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("site")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's notice about MkDocs 2.0, not ours
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(folder)], cwd=ROOT,
                           env=environment, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return folder


def test_the_site_builds_strictly(site):
    pages = {path.relative_to(site).as_posix() for path in site.rglob("index.html")}
    assert {"index.html", "api/backend/index.html", "api/spec/index.html", "api/weights/index.html"} <= pages
    # the API reference is generated from the code: the contract's registry and record are on it
    reference = (site / "api/backend/index.html").read_text()
    assert "common.backend.BACKENDS" in reference and "common.backend.Capabilities" in reference


def test_the_readme_is_short_and_keeps_its_quick_start():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MOST_LINES
    for command in QUICK_START:
        assert command in text.splitlines(), f"the README's quick start lost: {command}"


def readme_links_into_docs() -> list[tuple[str, str]]:
    """(docs page, anchor or "") for every relative link of the README into docs/."""
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", README.read_text())
    assert links, "the README links into docs/"
    return links


def built_page(site: Path, page: str) -> Path:
    """Where mkdocs (directory URLs) writes docs/<page>.md."""
    stem = Path(page).relative_to("docs").with_suffix("")
    return site / "index.html" if stem.as_posix() == "index" else site / stem / "index.html"


def test_the_readme_links_land_on_pages_that_exist():
    missing = [page for page, _ in readme_links_into_docs() if not (ROOT / page).is_file()]
    assert not missing, missing


def test_the_readme_links_land_on_headings_that_exist(site):
    broken = [f"{page}#{anchor}" for page, anchor in readme_links_into_docs()
              if anchor and f'id="{anchor}"' not in built_page(site, page).read_text()]
    assert not broken, broken
