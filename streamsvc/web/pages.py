"""The browser-facing routes: the playground at ``/`` and the API docs at ``/docs``.

Static files shipped in the package (no build step, no CDN). The rule: served with a
Content-Security-Policy that allows this origin only.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


def _page(name: str) -> Response:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers=_HEADERS)


async def playground(request: Request) -> Response:
    return _page("index.html")


async def docs(request: Request) -> Response:
    return _page("docs.html")
