"""The HTTP side of `vlm serve`: module-level FastAPI routes that read the app's `ServeState`
(`request.app.state.vlm`) and render what `vlm.serve.pages` / `ServeState` computed, plus the error handlers.

Routes hold no logic of their own beyond turning results into responses: pages are rendered on the server
(Jinja2), images and the DZI descriptor are sent as they come, and every error is written by `error_response`.
URLs carry slide ids only, never paths; static files come from the package's own folder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.serve import pages
from vlm.serve.state import FileGone, NotHere, ServeState

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")

router = APIRouter()


def _state(request: Request) -> ServeState:
    """The state `create_app` stored on the app: one per app, so two apps in a process do not mix."""
    return request.app.state.vlm


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A page from `templates/`; every page gets the metadata columns (the search form and result lists show them)."""
    context = {"meta_columns": _state(request).meta_columns, **context}
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status)


def error_response(request: Request, status: int, message: str, page: bool = True) -> Response:
    """An error as the caller reads it: JSON under /api/, else an HTML page (`page`) or plain text (images)."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    if page:
        return render(request, "error.html", status, message=message, q="")
    return Response(message, status_code=status, media_type="text/plain")


async def bad_request(request: Request, error: RequestValidationError) -> Response:
    """A query parameter of the wrong type (`page_no=zero`, `k=abc`): 400 naming the parameter."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
    message = problems if request.url.path.startswith("/api/") else f"bad request ({problems})"
    return error_response(request, 400, message)


async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) and the routes' `HTTPException`s."""
    return error_response(request, error.status_code, str(error.detail))


async def not_here(request: Request, error: NotHere) -> Response:
    """An unknown slide id, level or tile: 404, as an unknown path is."""
    return error_response(request, 404, str(error))


async def file_gone(request: Request, error: FileGone) -> Response:
    """A file broken after start-up: 410 naming it; only the slide page answers with a page."""
    return error_response(request, 410, str(error), page=request.url.path.startswith("/slide/"))


EXCEPTION_HANDLERS = {
    RequestValidationError: bad_request,
    StarletteHTTPException: http_error,
    NotHere: not_here,
    FileGone: file_gone,
}


@router.get("/", response_class=HTMLResponse)
def home(request: Request, q: str | None = None, similar: str | None = None, page_no: int = 1) -> Response:
    """The search form, and a page of results when a text `q` or a slide id `similar` is given."""
    if q is None and similar is None:
        return render(request, "search.html", q="", results=[], title=None)
    state = _state(request)
    try:
        found = pages.search_page(state, q, similar, page_no)
    except ValueError as error:
        return render(request, "search.html", 400, q=q or "", results=[], title=None, message=str(error))
    return render(request, "search.html", **vars(found), has_slide=state.slides)


@router.get("/api/search")
def api_search(request: Request, q: str | None = None, slide_id: str | None = None, k: int = 10) -> Response:
    """The same results as `vlm search --json`, for a text `q` or slides like `slide_id`."""
    try:
        return JSONResponse(pages.search_results(_state(request), q, slide_id, k))
    except ValueError as error:
        return JSONResponse({"error": str(error)}, status_code=400)


@router.get("/slide/{slide_id}", response_class=HTMLResponse)
def slide(request: Request, slide_id: str, q: str | None = None) -> Response:
    """A slide in the deep-zoom viewer, with the query's heat, zero-shot probabilities and similar slides."""
    state = _state(request)
    shown = pages.slide_page(state, slide_id, q)
    return render(request, "slide.html", **vars(shown), message=shown.message, has_slide=state.slides)


@router.get("/thumb/{slide_id}.png")
def thumbnail(request: Request, slide_id: str) -> Response:
    return Response(_state(request).thumbnail(slide_id), media_type="image/png")


@router.get("/heat/{slide_id}.png")
def heat(request: Request, slide_id: str, q: str) -> Response:
    state = _state(request)
    state.known(slide_id, state.features)  # an unknown slide is 404 before its query is looked at
    try:
        q = pages.check_query(q)
    except ValueError as error:
        raise HTTPException(400, str(error)) from None
    return Response(state.heat_png(slide_id, q)[0], media_type="image/png")


@router.get("/dzi/{slide_id}.dzi")
def dzi(request: Request, slide_id: str) -> Response:
    return Response(_state(request).dzi(slide_id), media_type="application/xml")


@router.get("/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
def dzi_tile(request: Request, slide_id: str, level: int, col: int, row: int) -> Response:
    """One JPEG tile of the deep-zoom pyramid (encoded outside the state's lock)."""
    tile = _state(request).tile(slide_id, level, col, row)
    buffer = io.BytesIO()
    tile.convert("RGB").save(buffer, format="JPEG", quality=85)
    return Response(buffer.getvalue(), media_type="image/jpeg")


__all__ = ["EXCEPTION_HANDLERS", "router"]
