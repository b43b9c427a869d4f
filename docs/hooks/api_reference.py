"""MkDocs hook: the API page lists exactly the public names of `vlm._EXPORTS`, in its order and groups.

`vlm/__init__.py`'s `_EXPORTS` is the one table of public names; the page is generated from it at build time
(no second list to drift), and mkdocstrings renders each entry from its docstring. The table is read as
source text, so the build imports nothing of vlm.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

MARKER = "<!-- API-REFERENCE -->"


def api_reference(init: Path) -> str:
    """Markdown for every `_EXPORTS` row: a section per comment line of the table, one `:::` entry per name."""
    source = init.read_text()
    tree = ast.parse(source)
    table = next(
        node for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS"
    )
    exports: dict[str, str] = ast.literal_eval(table.value)
    lines = source.splitlines()[table.lineno: table.end_lineno - 1]
    out, seen = [], []
    for line in lines:
        line = line.strip()
        if line.startswith("#"):
            title = line.lstrip("# ")
            out.append(f"## {title[:1].upper()}{title[1:]}\n")
            continue
        match = re.match(r'"(\w+)":\s*"([\w.]+):(\w+)"', line)
        if match is None:
            continue
        name, module, attribute = match.groups()
        seen.append(name)
        out.append(f"::: {module}.{attribute}\n    options:\n      heading: \"vlm.{name}\"\n"
                   f"      toc_label: \"{name}\"\n")
    if seen != list(exports):
        raise ValueError(f"{init}: could not read every row of _EXPORTS (read {seen}, table has {list(exports)})")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    init = Path(config.config_file_path).parent / "vlm" / "__init__.py"
    return markdown.replace(MARKER, api_reference(init))
