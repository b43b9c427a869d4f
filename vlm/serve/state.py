"""What `vlm serve` loads once at start-up and reads on every request: the slide index and its model, the
id -> file tables of the slide and feature folders, the zero-shot classifier, and caches of what was computed.

Kept apart from HTTP so that a notebook gets the same thumbnails, heat PNGs and probabilities as the viewer
(`load_state(...)`, then its methods), and so the routes stay thin. Each public method takes `lock` itself:
OpenSlide handles and the slide encoder are shared by the server's worker threads.

Safety: at start-up the slide and feature folders are scanned once into an id -> file table (files whose real
path leaves their folder, e.g. through a symlink, are skipped), so no slide id can name a file outside them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.wsi.collect import SLIDE_EXTENSIONS

log = logging.getLogger(__name__)

HEAT_PIXELS_PER_TILE = 4
DZ_TILE = 254  # the DeepZoom default: 254 + 2 px overlap = 256-px JPEG tiles
THUMBNAIL_PIXELS = 256


class FileGone(Exception):
    """A slide or feature file that was readable at start-up no longer is (moved, cut short, replaced)."""


class NotHere(LookupError):
    """A slide id, deep-zoom level or tile this server does not have: the viewer answers 404 with the message."""


def _scan(roots: Sequence[str | os.PathLike[str]], suffixes: Collection[str], wanted: set[str]) -> dict[str, Path]:
    """id -> file for files directly in `roots` whose real path stays inside the root; first root wins."""
    from vlm.io import slide_id_from_path

    found: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise MissingInputError(f"{root}: not a folder (give folders of slides / feature files)")
        real_root = root.resolve()
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in suffixes:
                continue
            slide_id = slide_id_from_path(path)
            if slide_id not in wanted or slide_id in found:
                continue
            real = path.resolve()
            if not real.is_file() or not real.is_relative_to(real_root):
                log.warning("skipping %s: it resolves to %s, outside %s", path, real, real_root)
                continue
            found[slide_id] = real
    return found


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What OpenSlide, h5py and vlm's readers raise on a missing, truncated or foreign file."""
    import openslide

    return (OSError, ValueError, KeyError, openslide.OpenSlideError)


def _png(image: Any) -> bytes:
    """A PIL image as PNG bytes (what the thumbnail and heat routes send)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ServeState:
    """Everything the routes need, loaded once at start-up; caches fill as slides are looked at."""

    index: Any
    slides: dict[str, Path]
    features: dict[str, Path]
    classifier: Any = None
    slide_checkpoint: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _encoder: Any = None
    _deepzoom: dict[str, Any] = field(default_factory=dict)
    _thumbs: dict[str, bytes] = field(default_factory=dict)
    _heat: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)
    _embeddings: dict[str, Any] = field(default_factory=dict)
    tiles_served: int = 0
    ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = frozenset(self.index.keys)  # the only ids a request may name; a set, made once

    @property
    def meta_columns(self) -> list[str]:
        """The index's metadata columns shown beside each slide (not its row number nor its id)."""
        return [c for c in self.index.metadata.columns if c not in ("faiss_id", self.index.key)]

    def known(self, slide_id: str, table: dict[str, Path] | None = None) -> str:
        """`slide_id` if it is indexed (and in `table`: `slides` or `features`, when given), else `NotHere`."""
        if slide_id not in self.ids or (table is not None and slide_id not in table):
            raise NotHere(f"no slide {slide_id!r} here")
        return slide_id

    @property
    def encoder(self) -> Any:
        """The slide encoder, rebuilt from the model on first use: heat and probabilities need it, search not."""
        from vlm.model.attribution import slide_tower

        if self._encoder is None:
            self._encoder = slide_tower(self.index.model, self.slide_checkpoint)
        return self._encoder

    @contextlib.contextmanager
    def reading(self, slide_id: str, path: Path, what: str) -> Iterator[None]:
        """Turn a read error of `path` into `FileGone` naming it, and forget what was cached for the slide
        (an OpenSlide handle that failed once stays failed; a restored file is then opened afresh)."""
        try:
            yield
        except _unreadable_errors() as error:
            self._deepzoom.pop(slide_id, None)
            self._thumbs.pop(slide_id, None)
            self._embeddings.pop(slide_id, None)
            for key in [k for k in self._heat if k[0] == slide_id]:
                del self._heat[key]
            reason = "it is no longer there" if not path.exists() else f"{type(error).__name__}: {error}"
            log.warning("slide %s: cannot read its %s file %s (%s)", slide_id, what, path, reason)
            raise FileGone(
                f"slide {slide_id}: its {what} file {path.name} can no longer be read ({reason}); it was moved, "
                "cut short or replaced after vlm serve started. Restore it, or restart vlm serve"
            ) from error

    def _opened(self, slide_id: str) -> Any:
        """(OpenSlide, DeepZoomGenerator) of a slide, opened once; the caller holds `lock`."""
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.known(slide_id, self.slides)
        if slide_id not in self._deepzoom:
            with self.reading(slide_id, self.slides[slide_id], "slide"):
                slide = openslide.OpenSlide(str(self.slides[slide_id]))
                self._deepzoom[slide_id] = (slide, DeepZoomGenerator(slide, DZ_TILE, 1))
        return self._deepzoom[slide_id]

    def dzi(self, slide_id: str) -> str:
        """The slide's Deep Zoom descriptor (XML) for OpenSeadragon."""
        with self.lock:
            return self._opened(slide_id)[1].get_dzi("jpeg")

    def tile(self, slide_id: str, level: int, col: int, row: int) -> Any:
        """One deep-zoom tile as a PIL image; a level or tile outside the slide is `NotHere`."""
        with self.lock:
            generator = self._opened(slide_id)[1]
            if not 0 <= level < generator.level_count:
                raise NotHere(f"no deep-zoom level {level}")
            cols, rows = generator.level_tiles[level]
            if not (0 <= col < cols and 0 <= row < rows):
                raise NotHere(f"no tile {col}_{row} at level {level}")
            with self.reading(slide_id, self.slides[slide_id], "slide"):
                tile = generator.get_tile(level, (col, row))
            self.tiles_served += 1
        return tile

    def thumbnail(self, slide_id: str) -> bytes:
        """A PNG of the whole slide that fits 256 x 256 px, made once."""
        with self.lock:
            if slide_id not in self._thumbs:
                slide = self._opened(slide_id)[0]
                with self.reading(slide_id, self.slides[slide_id], "slide"):
                    image = slide.get_thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
                self._thumbs[slide_id] = _png(image.convert("RGB"))
            return self._thumbs[slide_id]

    def heat_png(self, slide_id: str, query: str) -> tuple[bytes, float]:
        """The query's tile heat over the whole slide as a transparent PNG, and the slide score."""
        from PIL import Image

        from vlm.model.attribution import slide_heat
        from vlm.plots import heat_grid, heat_rgba

        self.known(slide_id, self.features)
        key = (slide_id, query)
        with self.lock:
            if key not in self._heat:
                with self.reading(slide_id, self.features[slide_id], "tile-feature"):
                    heat = slide_heat(self.index.model, self.encoder, self.features[slide_id], [query], faithful=False)
                dimensions = self._opened(slide_id)[0].dimensions
                rgba = heat_rgba(heat_grid(heat, 0, dimensions, heat.tile_size / HEAT_PIXELS_PER_TILE), alpha=0.7)
                self._heat[key] = (_png(Image.fromarray(rgba, "RGBA")), float(heat.slide_scores[0]))
            return self._heat[key]

    def probabilities(self, slide_id: str) -> list[tuple[str, float]]:
        """Zero-shot class probabilities of a slide, highest first, from its tile features through the slide
        encoder (needs a classifier: `load_state(..., task=...)`)."""
        import torch

        from vlm.encoders.slide_inputs import load_slide_inputs

        if self.classifier is None:
            raise UsageError("no zero-shot task was given (`load_state(..., task=...)`, `vlm serve --task`)")
        self.known(slide_id, self.features)
        with self.lock:
            if slide_id not in self._embeddings:
                config = self.encoder.config
                with self.reading(slide_id, self.features[slide_id], "tile-feature"):
                    slide = load_slide_inputs(self.features[slide_id], config.in_dim, None, None, config.tile_size,
                                              config.grid_size)
                with torch.no_grad():
                    self._embeddings[slide_id] = self.encoder(
                        torch.from_numpy(slide.features)[None], torch.from_numpy(slide.coords)[None], pool="mean"
                    )
            probabilities = self.classifier.predict(self._embeddings[slide_id])[0]
        return sorted(zip(self.classifier.classes, map(float, probabilities), strict=True), key=lambda p: -p[1])


def load_state(
    index: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    slides: Sequence[str | os.PathLike[str]] = (),
    features: Sequence[str | os.PathLike[str]] = (),
    task: str | os.PathLike[str] | None = None,
    slide_checkpoint: str | os.PathLike[str] | None = None,
) -> ServeState:
    """Load the slide index (with its model) and scan the folders; every input is checked here, before any
    request, so a bad path fails at start-up with its name rather than on the first page view."""
    from vlm.retrieval import ReportIndex, load_index

    loaded = load_index(index, model=model)
    if isinstance(loaded, ReportIndex):
        raise InputError(f"{index} is a report index; `vlm serve` needs a slide index (`vlm index build`)")
    keys = set(loaded.keys)
    state = ServeState(
        index=loaded,
        slides=_scan(slides, SLIDE_EXTENSIONS, keys),
        features=_scan(features, {".h5"}, keys),
        slide_checkpoint=str(slide_checkpoint) if slide_checkpoint else None,
    )
    if task is not None:
        from vlm.model.zeroshot import ZeroShotClassifier

        state.classifier = ZeroShotClassifier.from_prompt_file(loaded.model, task)
    log.info("serving %d slides (%d with slide files, %d with features)", len(keys), len(state.slides),
             len(state.features))
    return state


__all__ = ["FileGone", "NotHere", "ServeState", "load_state"]
