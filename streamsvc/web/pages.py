"""The browser-facing routes: the playground at ``/`` and the API docs at ``/docs``.

Static files shipped in the package (the editor bundle prebuilt, no CDN). The rule: served
with a Content-Security-Policy that allows this origin only (plus, for the playground, a
per-response nonce for the code editor's <style> element).
"""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
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


#: Where index.html names the nonce of the playground's one <style> element (the code editor's).
NONCE_SLOT = "__STYLE_NONCE__"


@functools.cache
def _template(name: str) -> str:
    return (STATIC_DIR / name).read_text()


async def playground(request: Request) -> Response:
    """index.html with a fresh style nonce, which its CSP admits and nothing else knows."""
    nonce = secrets.token_urlsafe(18)
    csp = CSP.replace("style-src 'self'", f"style-src 'self' 'nonce-{nonce}'")
    return HTMLResponse(
        _template("index.html").replace(NONCE_SLOT, nonce),
        headers={**_HEADERS, "Content-Security-Policy": csp},
    )


async def docs(request: Request) -> Response:
    return _page("docs.html")
