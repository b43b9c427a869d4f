"""The offline end-to-end demo (`vlm demo`): a synthetic cohort through every stage of the pipeline.

The demo's names live here, not in the flat `vlm` API (which holds what a user's own data needs):
`from vlm.demo import DemoSettings, run_demo`. Lazy like `vlm` itself, so `import vlm.demo` loads no torch.
"""

from __future__ import annotations

from typing import Any

from vlm import _lazy_export

_EXPORTS: dict[str, str] = {
    "DemoSettings": "vlm.demo.run:DemoSettings",
    "run_demo": "vlm.demo.run:run_demo",
    "demo_text_encoder": "vlm.demo.run:minilm_path",
    "DEMO_SEARCH_QUERY": "vlm.demo.run:SEARCH_QUERY",
    "check_wording_unseen": "vlm.demo.run:check_wording_unseen",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return _lazy_export(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
