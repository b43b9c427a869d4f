"""`vlm serve`: a local web app to search slides by text and look at them.

Stack: FastAPI (routing, validation, JSON) + Jinja2 templates rendered on the server (the result list is in the
HTML, so it works without JavaScript and is easy to test) + uvicorn; the only JavaScript is the vendored
OpenSeadragon deep-zoom viewer, fed by OpenSlide's `DeepZoomGenerator`.

Three parts: `vlm.serve.state` loads and holds what the routes read (`load_state`, `ServeState`), `vlm.serve.pages`
computes what a page shows, `vlm.serve.routes` turns that into HTTP. This module only assembles the app and runs it.

Safety: URLs carry slide ids only, never paths; the slide and feature folders are scanned once at start-up
(`vlm.serve.state`), so no request can name a file outside them; static files come from the package's own folder.
Requests whose `Host` header names another host are refused (400, Starlette's `TrustedHostMiddleware`): a page
on another site that rebinds its DNS name to 127.0.0.1 cannot read the search API, metadata or tiles.
A slide or feature file that stops being readable after start-up (moved, cut short, replaced) answers 410 with
a message naming it; the server keeps serving the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vlm.serve.state import FileGone, ServeState, load_state

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::")


def allowed_hosts(host: str) -> list[str]:
    """The `Host` header values (without port) the server answers: this machine's names and `host` itself.

    IPv6 literals are bracketed, as they stand in a `Host` header. A wildcard bind address (0.0.0.0) is no
    name a client uses, so only the local names are answered then.
    """
    names = {*LOCAL_HOSTS, host} - set(WILDCARD_HOSTS)
    return sorted(f"[{name}]" if ":" in name else name.lower() for name in names)


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
    only requests addressed to this machine or to `host` are answered (see `allowed_hosts`).

    Inputs are checked and loaded by `load_state` before the app exists; the routes read it from `app.state.vlm`.
    """
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from vlm.serve.routes import EXCEPTION_HANDLERS, router

    state = load_state(index, model=model, slides=slides, features=features, task=task,
                       slide_checkpoint=slide_checkpoint)
    app = FastAPI(title="vlm", docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers=EXCEPTION_HANDLERS)
    app.state.vlm = state
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
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
                             "choose another `port`, or 0 for a free one") from error
        app = create_app(index, host=host, **options)
        bound = sock.getsockname()[1]
        name = "127.0.0.1" if host in WILDCARD_HOSTS else host  # a wildcard is no address to open (nor answered)
        print(f"vlm serve: open http://{'[' + name + ']' if ':' in name else name}:{bound}/ (Ctrl-C stops)",
              flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["LOCAL_HOSTS", "FileGone", "ServeState", "allowed_hosts", "create_app", "load_state", "serve"]
