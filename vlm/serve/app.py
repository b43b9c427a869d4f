"""`vlm serve`: a local web app to search slides by text and look at them.

Stack: FastAPI (routing, validation, JSON) + Jinja2 templates rendered on the server (the result list is in the
HTML, so it works without JavaScript and is easy to test) + uvicorn; the only JavaScript is the vendored
OpenSeadragon deep-zoom viewer, fed by OpenSlide's `DeepZoomGenerator`.

Safety: URLs carry slide ids only, never paths. At start-up the slide and feature folders are scanned once
into an id -> file table (files whose real path leaves their folder, e.g. through a symlink, are skipped),
so no request can name a file outside those folders; static files come from the package's own folder.
Requests whose `Host` header names another host are refused (400, Starlette's `TrustedHostMiddleware`): a page
on another site that rebinds its DNS name to 127.0.0.1 cannot read the search API, metadata or tiles.
A slide or feature file that stops being readable after start-up (moved, cut short, replaced) answers 410 with
a message naming it; the server keeps serving the others.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.wsi.collect import SLIDE_EXTENSIONS

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::")
PER_PAGE = 10
MAX_QUERY_CHARS = 500
MAX_PAGE = 100
SIMILAR = 5
HEAT_PIXELS_PER_TILE = 4
DZ_TILE = 254  # the DeepZoom default: 254 + 2 px overlap = 256-px JPEG tiles


def _scan(roots: Sequence[str | os.PathLike[str]], suffixes: Collection[str], wanted: set[str]) -> dict[str, Path]:
    """id -> file for files directly in `roots` whose real path stays inside the root; first root wins."""
    from vlm.io import slide_id_from_path

    found: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder (give folders of slides / feature files)")
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


def allowed_hosts(host: str) -> list[str]:
    """The `Host` header values (without port) the server answers: this machine's names and `host` itself.

    IPv6 literals are bracketed, as they stand in a `Host` header. A wildcard bind address (0.0.0.0) is no
    name a client uses, so only the local names are answered then.
    """
    names = {*LOCAL_HOSTS, host} - set(WILDCARD_HOSTS)
    return sorted(f"[{name}]" if ":" in name else name.lower() for name in names)


class FileGone(Exception):
    """A slide or feature file that was readable at start-up no longer is (moved, cut short, replaced)."""


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What OpenSlide, h5py and vlm's readers raise on a missing, truncated or foreign file."""
    import openslide

    return (OSError, ValueError, KeyError, openslide.OpenSlideError)


@dataclass
class ServeState:
    """Everything the routes need, loaded once at start-up."""

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

    @property
    def encoder(self) -> Any:
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

    def opened(self, slide_id: str) -> Any:
        """(OpenSlide, DeepZoomGenerator) of a slide, opened once."""
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        if slide_id not in self._deepzoom:
            with self.reading(slide_id, self.slides[slide_id], "slide"):
                slide = openslide.OpenSlide(str(self.slides[slide_id]))
                self._deepzoom[slide_id] = (slide, DeepZoomGenerator(slide, DZ_TILE, 1))
        return self._deepzoom[slide_id]

    def deepzoom(self, slide_id: str) -> Any:
        return self.opened(slide_id)[1]

    def thumbnail(self, slide_id: str) -> bytes:
        if slide_id not in self._thumbs:
            slide = self.opened(slide_id)[0]
            with self.reading(slide_id, self.slides[slide_id], "slide"):
                image = slide.get_thumbnail((256, 256))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            self._thumbs[slide_id] = buffer.getvalue()
        return self._thumbs[slide_id]

    def heat_png(self, slide_id: str, query: str) -> tuple[bytes, float]:
        """The query's tile heat over the whole slide as a transparent PNG, and the slide score."""
        from PIL import Image

        from vlm.model.attribution import slide_heat
        from vlm.plots import heat_grid, heat_rgba

        key = (slide_id, query)
        if key not in self._heat:
            with self.reading(slide_id, self.features[slide_id], "tile-feature"):
                heat = slide_heat(self.index.model, self.encoder, self.features[slide_id], [query], faithful=False)
            dimensions = self.opened(slide_id)[0].dimensions
            rgba = heat_rgba(heat_grid(heat, 0, dimensions, heat.tile_size / HEAT_PIXELS_PER_TILE), alpha=0.7)
            buffer = io.BytesIO()
            Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
            self._heat[key] = (buffer.getvalue(), float(heat.slide_scores[0]))
        return self._heat[key]

    def probabilities(self, slide_id: str) -> list[tuple[str, float]]:
        """Zero-shot class probabilities of a slide, from its tile features through the slide encoder."""
        import torch

        from vlm.encoders.slide_inputs import load_slide_inputs

        if slide_id not in self._embeddings:
            config = self.encoder.config
            with self.reading(slide_id, self.features[slide_id], "tile-feature"):
                slide = load_slide_inputs(self.features[slide_id], config.in_dim, None, None, config.tile_size,
                                          config.grid_size)  # fmt: skip
            features, coords = slide.features, slide.coords
            with torch.no_grad():
                self._embeddings[slide_id] = self.encoder(
                    torch.from_numpy(features)[None], torch.from_numpy(coords)[None], pool="mean"
                )
        probabilities = self.classifier.predict(self._embeddings[slide_id])[0]
        return sorted(zip(self.classifier.classes, map(float, probabilities), strict=True), key=lambda p: -p[1])


def _records(table: Any) -> list[dict[str, Any]]:
    """Search results as JSON-ready dicts, exactly as `vlm search --json` prints them."""
    from vlm.retrieval.index import result_records

    return result_records(table)


def _check_query(q: str) -> str:
    q = q.strip()
    if not q:
        raise ValueError("the search text is empty: type a phrase, e.g. a line of a report")
    if len(q) > MAX_QUERY_CHARS:
        raise ValueError(f"the search text is {len(q)} characters long; keep it under {MAX_QUERY_CHARS}")
    return q


def create_app(
    index: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    slides: Sequence[str | os.PathLike[str]] = (),
    features: Sequence[str | os.PathLike[str]] = (),
    task: str | os.PathLike[str] | None = None,
    slide_checkpoint: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
) -> FastAPI:
    """The FastAPI app over a slide index; `slides` / `features` are the only folders files are read from, and
    only requests addressed to this machine or to `host` are answered (see `allowed_hosts`)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from vlm.retrieval import ReportIndex, load_index

    loaded = load_index(index, model=model)
    if isinstance(loaded, ReportIndex):
        raise ValueError(f"{index} is a report index; `vlm serve` needs a slide index (`vlm index build`)")
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
             len(state.features))  # fmt: skip

    app = FastAPI(title="vlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlm = state
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    meta_columns = [c for c in loaded.metadata.columns if c not in ("faiss_id", loaded.key)]

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"meta_columns": meta_columns, **context}, status_code=status)

    def known(slide_id: str, table: dict[str, Path] | None = None) -> str:
        if slide_id not in keys or (table is not None and slide_id not in table):
            raise HTTPException(404, f"no slide {slide_id!r} here")
        return slide_id

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": problems}, status_code=400)
        return page(request, "error.html", 400, message=f"bad request ({problems})", q="")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)
        return page(request, "error.html", error.status_code, message=str(error.detail), q="")

    @app.exception_handler(FileGone)
    async def file_gone(request: Request, error: FileGone) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(error)}, status_code=410)
        if request.url.path.startswith("/slide/"):
            return page(request, "error.html", 410, message=str(error), q="")
        return Response(str(error), status_code=410, media_type="text/plain")

    def search(q: str | None, similar: str | None, k: int) -> tuple[Any, str]:
        if similar:
            return loaded.search_slide(known(similar), k=k), f"slides like {similar}"
        return loaded.search_text(_check_query(q or ""), k=k), q or ""

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, q: str | None = None, similar: str | None = None, page_no: int = 1) -> Response:
        if q is None and similar is None:
            return page(request, "search.html", q="", results=[], title=None)
        try:
            if not 1 <= page_no <= MAX_PAGE:
                raise ValueError(f"page {page_no} is out of range 1–{MAX_PAGE}")
            count = min(len(keys) - (1 if similar else 0), page_no * PER_PAGE)
            table, title = search(q, similar, max(count, 1))
        except ValueError as error:
            return page(request, "search.html", 400, q=q or "", results=[], title=None, message=str(error))
        results = _records(table)[(page_no - 1) * PER_PAGE :]
        more = page_no * PER_PAGE < len(keys) - (1 if similar else 0)
        return page(request, "search.html", q=q or "", similar=similar, results=results, title=title,
                    page_no=page_no, more=more, offset=(page_no - 1) * PER_PAGE, has_slide=state.slides)  # fmt: skip

    @app.get("/api/search")
    def api_search(q: str | None = None, slide_id: str | None = None, k: int = 10) -> Response:
        if (q is None) == (slide_id is None):
            return JSONResponse({"error": "give either q (a text) or slide_id"}, status_code=400)
        try:
            if not 1 <= k <= 1000:
                raise ValueError(f"k must be within 1–1000, got {k}")
            table, _ = search(q, slide_id, k)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(_records(table))

    @app.get("/slide/{slide_id}", response_class=HTMLResponse)
    def slide_page(request: Request, slide_id: str, q: str | None = None) -> Response:
        known(slide_id, state.slides)
        notes: list[str] = []
        heat_score = probabilities = None
        if q:
            try:
                q = _check_query(q)
                if slide_id not in state.features:
                    notes.append("no tile features for this slide (start vlm serve with --features): no heatmap")
                else:
                    with state.lock:
                        heat_score = state.heat_png(slide_id, q)[1]
            except (ValueError, FileNotFoundError, FileGone) as error:
                notes.append(f"no heatmap: {error}")
        if state.classifier is not None and slide_id in state.features:
            try:
                with state.lock:
                    probabilities = state.probabilities(slide_id)
            except (ValueError, FileNotFoundError, FileGone) as error:
                notes.append(f"no zero-shot probabilities: {error}")
        message = "; ".join(notes) or None
        row = loaded.metadata[loaded.metadata[loaded.key] == slide_id].iloc[0]
        meta = {c: row[c] for c in meta_columns if not (isinstance(row[c], float) and math.isnan(row[c]))}
        similar = _records(loaded.search_slide(slide_id, k=min(SIMILAR, max(len(keys) - 1, 1))))
        return page(request, "slide.html", slide_id=slide_id, q=q or "", heat_score=heat_score, message=message,
                    probabilities=probabilities, meta=meta, similar=similar, has_slide=state.slides,
                    task=state.classifier.task.name if state.classifier is not None else None)  # fmt: skip

    @app.get("/thumb/{slide_id}.png")
    def thumbnail(slide_id: str) -> Response:
        known(slide_id, state.slides)
        with state.lock:
            return Response(state.thumbnail(slide_id), media_type="image/png")

    @app.get("/heat/{slide_id}.png")
    def heat(slide_id: str, q: str) -> Response:
        known(slide_id, state.features)
        try:
            q = _check_query(q)
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        with state.lock:
            return Response(state.heat_png(slide_id, q)[0], media_type="image/png")

    @app.get("/dzi/{slide_id}.dzi")
    def dzi(slide_id: str) -> Response:
        known(slide_id, state.slides)
        with state.lock:
            return Response(state.deepzoom(slide_id).get_dzi("jpeg"), media_type="application/xml")

    @app.get("/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
    def dzi_tile(slide_id: str, level: int, col: int, row: int) -> Response:
        known(slide_id, state.slides)
        with state.lock:
            generator = state.deepzoom(slide_id)
            if not 0 <= level < generator.level_count:
                raise HTTPException(404, f"no deep-zoom level {level}")
            cols, rows = generator.level_tiles[level]
            if not (0 <= col < cols and 0 <= row < rows):
                raise HTTPException(404, f"no tile {col}_{row} at level {level}")
            with state.reading(slide_id, state.slides[slide_id], "slide"):
                tile = generator.get_tile(level, (col, row))
            state.tiles_served += 1
        buffer = io.BytesIO()
        tile.convert("RGB").save(buffer, format="JPEG", quality=85)
        return Response(buffer.getvalue(), media_type="image/jpeg")

    return app


def serve(
    index: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    **options: Any,
) -> None:
    """Build the app and run it with uvicorn until interrupted.

    The port is checked and bound before the model loads, so a bad or busy port fails at once; `port=0` takes
    a free port and the printed address is the one bound.
    """
    import socket

    import uvicorn

    from vlm.errors import UsageError

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"`port` {port} is not a TCP port: give 0–65535 (0 picks a free one)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise UsageError(f"cannot listen on {host} port {port} ({error.strerror or error}); "
                             "choose another `port`, or 0 for a free one") from error  # fmt: skip
        app = create_app(index, host=host, **options)
        bound = sock.getsockname()[1]
        name = "127.0.0.1" if host in WILDCARD_HOSTS else host  # a wildcard is no address to open (nor answered)
        print(f"vlm serve: open http://{'[' + name + ']' if ':' in name else name}:{bound}/ (Ctrl-C stops)",
              flush=True)  # fmt: skip
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["LOCAL_HOSTS", "FileGone", "ServeState", "allowed_hosts", "create_app", "serve"]
