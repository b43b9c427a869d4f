"""The docs: a short README that links into `docs/`, a site that builds with every warning an error, and an API
page generated from the one table of public names (`vlm._EXPORTS`)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vlm

ROOT = Path(__file__).parents[1]


def _hook():
    """The MkDocs hook that writes the API page, loaded from its file as MkDocs loads it."""
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "docs" / "hooks" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"


def test_the_readme_itself_shows_the_shortest_real_path() -> None:
    """A newcomer reads the whole chain from slides to search on the first page, not only in the docs."""
    readme = (ROOT / "README.md").read_text()
    verbs = [line.split()[1] for line in re.findall(r"^vlm .*$", readme, flags=re.M)]
    assert {"info", "tile", "embed-tiles", "embed-slides", "train", "zeroshot", "index", "search"} <= set(verbs)
    assert "make demo" in readme and "make install" in readme


def test_the_api_page_lists_every_public_name_from_the_exports_table() -> None:
    page = _hook().api_reference(ROOT / "vlm" / "__init__.py")
    entries = re.findall(r"^::: ([\w.]+)\n    options:\n      heading: \"vlm\.(\w+)\"", page, flags=re.M)
    assert [name for _, name in entries] == list(vlm._EXPORTS)
    assert {name: target for target, name in entries} == {
        name: target.replace(":", ".") for name, target in vlm._EXPORTS.items()
    }


def test_an_exports_row_the_hook_cannot_read_stops_the_build(tmp_path: Path) -> None:
    """A row written another way (here: single quotes) would silently drop off the page; it is an error instead."""
    init = tmp_path / "__init__.py"
    init.write_text('_EXPORTS: dict[str, str] = {\n    # one\n    "a": "vlm.x:a",\n    \'b\': \'vlm.y:b\',\n}\n')
    with pytest.raises(ValueError, match="could not read every row"):
        _hook().api_reference(init)


@pytest.mark.slow
def test_the_site_builds_strictly_offline_and_documents_every_public_name(tmp_path: Path) -> None:
    """`mkdocs build --strict` (what `make docs` and CI run): a broken link or anchor, a page missing from the nav
    or a docstring mkdocstrings cannot read fails it. The theme loads no web fonts, so nothing is fetched."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    for name, target in vlm._EXPORTS.items():
        assert f'id="{target.replace(":", ".")}"' in api, name
    html = "\n".join(page.read_text() for page in site.rglob("*.html"))
    assert "fonts.googleapis" not in html and "fonts.gstatic" not in html
    # the README's sections the home page includes arrived (a snippet that silently included nothing would not)
    home = (site / "index.html").read_text()
    assert "the shortest real path" in home and "make demo" in home
